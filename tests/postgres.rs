//! PostgreSQL adapter, live against the server on 127.0.0.1:5432 (override with TETHER_TEST_PG),
//! in a database created for this run and dropped after. These tests fail, never skip, when
//! PostgreSQL is unreachable.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use postgres::{Client, NoTls};
use serde_json::{json, Map, Value};
use tether::config::{ConflictPolicy, Direction, TableConfig};
use tether::db::postgres::{self as pg, PgCheckpoint, PgSink, PgSource};
use tether_actors::ports::{ChangeSink, ChangeSource, Checkpoint};
use tether_schemas::{Op, Update, UpdateOp, UpdateStatus};

fn admin_url() -> String {
    std::env::var("TETHER_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// A uniquely named database, dropped when this is dropped.
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    fn new() -> TestDb {
        let name = format!(
            "tether_t_{}_{:x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut admin = Client::connect(&admin_url(), NoTls).unwrap_or_else(|e| {
            panic!(
                "PostgreSQL must be running for these tests ({}): {e}",
                admin_url()
            )
        });
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        let url = format!("{} dbname={name}", admin_url().replace("dbname=test", ""));
        let db = TestDb { name, url };
        db.client()
            .batch_execute(
                "CREATE TABLE patients (id bigint PRIMARY KEY, name text NOT NULL, dob date, balance numeric(10,2), \
                   photo bytea, external uuid, seen_at timestamptz, active boolean, version int NOT NULL DEFAULT 1);
                 CREATE TABLE payments (id bigserial PRIMARY KEY, patient_id bigint NOT NULL, amount_cents int NOT NULL);
                 CREATE TABLE scratch (id int);",
            )
            .expect("schema");
        db
    }

    fn client(&self) -> Client {
        Client::connect(&self.url, NoTls).expect("connect test db")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&admin_url(), NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn tables(policy: ConflictPolicy) -> Vec<TableConfig> {
    let mut p = TableConfig::new("patients", "patient", &["id"], Direction::Both);
    p.conflict = policy;
    p.version_column = Some("version".into());
    vec![
        p,
        TableConfig::new("payments", "payment", &["id"], Direction::Up),
    ]
}

fn update(id: &str, op: UpdateOp, key: i64, row: Option<Value>) -> Update {
    Update {
        update_id: id.into(),
        entity: "patient".into(),
        op,
        key: json!({"id": key}).as_object().cloned().unwrap_or_default(),
        row: row.and_then(|r| r.as_object().cloned()),
    }
}

/// The history check at adapter level: everything committed is read exactly once, in order.
fn read_all(src: &PgSource) -> Vec<tether_schemas::Event> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let batch = src.read_after(after, 7).expect("read");
        if batch.is_empty() {
            return out;
        }
        after = batch.last().map(|e| e.seq).unwrap_or(after);
        out.extend(batch);
    }
}

/// The shared table of values (`values::fixture`) round-trips through PostgreSQL: applied as
/// cloud updates (to `timestamptz` and to `timestamp` columns), captured again by a local write
/// in another session time zone, every value comes back in the same wire form; values an
/// application writes natively are captured in that form too.
#[test]
fn values_round_trip_in_one_wire_form() {
    let db = TestDb::new();
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE kinds (id int PRIMARY KEY, flag boolean, at timestamptz, day date, \
           amount numeric(12,4), data bytea, note text);
         CREATE TABLE kinds_naive (id int PRIMARY KEY, flag boolean, at timestamp(6), day date, \
           amount numeric, data bytea, note varchar(100));",
    )
    .expect("tables");
    let t = vec![
        TableConfig::new("kinds", "kind", &["id"], Direction::Both),
        TableConfig::new("kinds_naive", "kind_naive", &["id"], Direction::Both),
    ];
    pg::install(&db.url, &t).expect("install");
    let sink = PgSink::open(&db.url, &t).expect("sink");
    let rows = tether::db::values::fixture::rows();
    for entity in ["kind", "kind_naive"] {
        for row in &rows {
            let out = sink
                .apply(&Update {
                    update_id: format!("{entity}-{}", row["id"]),
                    entity: entity.into(),
                    op: UpdateOp::Upsert,
                    key: json!({"id": row["id"]})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    row: row.as_object().cloned(),
                })
                .expect("apply");
            assert_eq!(
                out.status,
                UpdateStatus::Applied,
                "{entity}: {:?}",
                out.reason
            );
        }
    }
    // Stored as PostgreSQL's own types.
    let ok: bool = c
        .query_one(
            "SELECT flag AND at = '2026-12-01 10:00:00+00' AND data = '\\x00ff'::bytea \
               AND amount = 12.5 AND day = '2026-12-01' FROM kinds WHERE id = 1",
            &[],
        )
        .expect("stored")
        .get(0);
    assert!(ok, "values stored as their PostgreSQL types");
    // Applied updates are not captured; local touches in another session zone capture all.
    c.batch_execute(
        "SET TIME ZONE 'Asia/Kolkata'; UPDATE kinds SET id = id; UPDATE kinds_naive SET id = id;",
    )
    .expect("touch");
    let src = PgSource::open(&db.url, &t).expect("source");
    let events = read_all(&src);
    for entity in ["kind", "kind_naive"] {
        let mut got: Vec<Value> = events
            .iter()
            .filter(|e| e.entity == entity)
            .map(|e| Value::Object(e.row.clone().expect("row")))
            .collect();
        got.sort_by_key(|r| r["id"].as_i64());
        assert_eq!(
            got, rows,
            "{entity}: every value comes back in the same wire form"
        );
    }
    // What an application writes, in its own session zone.
    c.batch_execute(
        "SET TIME ZONE 'America/New_York';
         INSERT INTO kinds VALUES (10, true, '2026-12-01 05:00:00', '2026-12-01', 12.50, '\\x00ff', 'app');
         INSERT INTO kinds_naive VALUES (10, false, '2026-12-01 10:00:00.25', NULL, 1e3, '\\x', NULL);",
    )
    .expect("app writes");
    let after = events.last().map_or(0, |e| e.seq);
    let mut more = Vec::new();
    common::poll_blocking("the application's writes", Duration::from_secs(10), || {
        let from = more.last().map_or(after, |e: &tether_schemas::Event| e.seq);
        more.extend(src.read_after(from, 100).expect("read"));
        more.len() >= 2
    });
    let more: Vec<Value> = more
        .iter()
        .map(|e| Value::Object(e.row.clone().expect("row")))
        .collect();
    assert_eq!(
        more,
        vec![
            json!({"id": 10, "flag": true, "at": "2026-12-01T10:00:00Z", "day": "2026-12-01",
                   "amount": "12.5", "data": "AP8=", "note": "app"}),
            json!({"id": 10, "flag": false, "at": "2026-12-01T10:00:00.25Z", "day": null,
                   "amount": "1000", "data": "", "note": null}),
        ]
    );
    // A binary value that is not base64 fails, naming the column.
    let out = sink
        .apply(&Update {
            update_id: "bad".into(),
            entity: "kind".into(),
            op: UpdateOp::Upsert,
            key: json!({"id": 1}).as_object().cloned().unwrap_or_default(),
            row: json!({"id": 1, "data": "\\x00ff"}).as_object().cloned(),
        })
        .expect("apply");
    assert_eq!(out.status, UpdateStatus::Failed);
    let reason = out.reason.unwrap_or_default();
    assert!(
        reason.contains("`data`") && reason.contains("base64"),
        "{reason}"
    );
}

/// What `install` refuses, `check` lists — every problem, not only the first; a key that is
/// neither the primary key nor a unique index is refused for a table cloud updates go to,
/// and a unique index on exactly the key is enough.
#[test]
fn check_lists_every_table_problem_and_install_refuses_a_non_unique_key() {
    use tether::config::Direction;
    let db = TestDb::new();
    let mapped = vec![
        TableConfig::new("scratch", "scratch", &["id"], Direction::Both),
        TableConfig::new("missing", "missing", &["id"], Direction::Both),
        TableConfig::new("patients", "patient", &["nope"], Direction::Both),
        // Up only: no uniqueness asked.
        TableConfig::new("scratch", "scratch_up", &["id"], Direction::Up),
    ];
    let (problems, installed) = pg::check(&db.url, &mapped).expect("check");
    assert!(!installed);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].contains("`scratch`: key [id] is not the primary key or a unique index"));
    assert!(problems[1].contains("`missing` (agent.tables) does not exist"));
    assert!(problems[2].contains("key column `nope` does not exist"));
    let err = pg::install(&db.url, &mapped[..1]).expect_err("refused");
    assert!(
        err.to_string()
            .contains("is not the primary key or a unique index"),
        "{err}"
    );
    db.client()
        .batch_execute("CREATE UNIQUE INDEX scratch_id ON scratch (id)")
        .expect("index");
    pg::install(&db.url, &mapped[..1]).expect("a unique index is enough");
    let (problems, installed) =
        pg::check(&db.url, &tables(ConflictPolicy::CloudWins)).expect("check");
    assert!(problems.is_empty() && installed, "{problems:?}");
}

#[test]
fn install_captures_multi_row_statements_and_uninstall_removes_everything() {
    let db = TestDb::new();
    let t = tables(ConflictPolicy::CloudWins);
    pg::install(&db.url, &t).expect("install");
    pg::install(&db.url, &t).expect("install is idempotent");
    let mut c = db.client();
    c.batch_execute(
        "INSERT INTO patients (id, name, dob, balance, photo, external, seen_at, active) VALUES
           (1, 'a', '1980-01-02', 12.50, '\\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-01-01T10:00:00Z', true),
           (2, 'b', NULL, NULL, NULL, NULL, NULL, NULL);
         UPDATE patients SET name = upper(name);
         UPDATE patients SET id = 10 WHERE id = 1;
         DELETE FROM patients WHERE id = 2;
         INSERT INTO payments (patient_id, amount_cents) SELECT g, g * 100 FROM generate_series(1, 5) g;",
    )
    .expect("writes");
    let src = PgSource::open(&db.url, &[]).expect("source");
    let events = read_all(&src);
    let ops: Vec<(&str, &str, i64)> = events
        .iter()
        .map(|e| {
            (
                e.entity.as_str(),
                e.op.as_str(),
                e.key["id"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        &ops[..7],
        &[
            ("patient", "insert", 1),
            ("patient", "insert", 2),
            ("patient", "update", 1),
            ("patient", "update", 2),
            ("patient", "delete", 1),
            ("patient", "update", 10),
            ("patient", "delete", 2),
        ]
    );
    assert_eq!(ops[7..].iter().filter(|o| o.0 == "payment").count(), 5);
    let first = events[0].row.as_ref().expect("row");
    assert_eq!(first["balance"], json!(12.50));
    assert_eq!(first["dob"], json!("1980-01-02"));
    assert_eq!(first["photo"], json!("\\x00ff"));
    assert_eq!(
        first["external"],
        json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    );
    pg::uninstall(&db.url, &t).expect("uninstall");
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'tether'",
            &[],
        )
        .expect("q")
        .get(0);
    assert_eq!(left, 0);
    let triggers: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'tether_capture'",
            &[],
        )
        .expect("q")
        .get(0);
    assert_eq!(triggers, 0);
    c.batch_execute("INSERT INTO patients (id, name) VALUES (99, 'still works')")
        .expect("plain insert");
}

/// PostgreSQL's triggers capture the whole row (`to_jsonb(NEW)`): a column added after
/// `install` travels at once, with no second install (the gateway then flags it if the entity
/// schema does not declare it: tests/security.rs and docs/DATABASES.md).
#[test]
fn a_column_added_after_install_is_captured_at_once() {
    let db = TestDb::new();
    let t = tables(ConflictPolicy::CloudWins);
    pg::install(&db.url, &t).expect("install");
    let mut c = db.client();
    c.batch_execute(
        "INSERT INTO patients (id, name) VALUES (1, 'a');
         ALTER TABLE patients ADD COLUMN colour text;
         INSERT INTO patients (id, name, colour) VALUES (2, 'b', 'red');
         UPDATE patients SET colour = 'blue' WHERE id = 1;",
    )
    .expect("writes");
    let src = PgSource::open(&db.url, &[]).expect("source");
    let events = read_all(&src);
    let colours: Vec<Value> = events
        .iter()
        .map(|e| {
            e.row
                .as_ref()
                .and_then(|r| r.get("colour").cloned())
                .unwrap_or(json!("absent"))
        })
        .collect();
    assert_eq!(colours, vec![json!("absent"), json!("red"), json!("blue")]);
}

#[test]
fn out_of_order_commits_are_never_skipped() {
    let db = TestDb::new();
    pg::install(&db.url, &tables(ConflictPolicy::CloudWins)).expect("install");
    let src = PgSource::open(&db.url, &[]).expect("source");
    let mut early = db.client();
    let mut late = db.client();
    // `early` takes its transaction id first (a write elsewhere), `late` takes seq 1, then
    // `early` takes seq 2 and commits while `late` is still open.
    let mut t_early = early.transaction().expect("begin");
    t_early
        .execute("INSERT INTO scratch VALUES (1)", &[])
        .expect("txid");
    let mut t_late = late.transaction().expect("begin");
    t_late
        .execute("INSERT INTO patients (id, name) VALUES (1, 'late')", &[])
        .expect("seq 1");
    t_early
        .execute("INSERT INTO patients (id, name) VALUES (2, 'early')", &[])
        .expect("seq 2");
    t_early.commit().expect("commit early");
    assert!(
        src.read_after(0, 100).expect("read").is_empty(),
        "seq 2 must wait for seq 1"
    );
    t_late.commit().expect("commit late");
    let seqs: Vec<u64> = read_all(&src).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2]);

    // A rolled-back transaction leaves a hole that is passed once nothing can fill it.
    let mut t = early.transaction().expect("begin");
    t.execute(
        "INSERT INTO patients (id, name) VALUES (3, 'rolled back')",
        &[],
    )
    .expect("seq 3");
    t.rollback().expect("rollback");
    early
        .execute("INSERT INTO patients (id, name) VALUES (4, 'after')", &[])
        .expect("seq 4");
    // The hole is passed once every transaction older than it has ended (other tests' open
    // transactions on this server can delay that a little).
    let mut batch = Vec::new();
    common::poll_blocking(
        "the rolled-back hole to be passed",
        Duration::from_secs(20),
        || {
            batch = src.read_after(2, 100).expect("read");
            !batch.is_empty()
        },
    );
    assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4]);
}

#[test]
fn concurrent_writers_holding_transactions_open_lose_nothing() {
    let db = TestDb::new();
    pg::install(&db.url, &tables(ConflictPolicy::CloudWins)).expect("install");
    let src = Arc::new(PgSource::open(&db.url, &[]).expect("source"));
    let writers = 6;
    let per = 40;
    let barrier = Arc::new(Barrier::new(writers));
    let mut handles = Vec::new();
    for w in 0..writers {
        let url = db.url.clone();
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(move || {
            let mut c = Client::connect(&url, NoTls).expect("connect");
            barrier.wait();
            for i in 0..per {
                let mut t = c.transaction().expect("begin");
                if i % 3 == 0 {
                    t.execute("INSERT INTO scratch VALUES (1)", &[])
                        .expect("txid first");
                }
                t.execute(
                    "INSERT INTO payments (patient_id, amount_cents) VALUES ($1, $2)",
                    &[&(w as i64), &(i as i32)],
                )
                .expect("insert");
                // Hold some transactions open while others commit.
                if (i + w) % 4 == 0 {
                    std::thread::sleep(Duration::from_millis(3));
                }
                if i % 11 == 5 {
                    t.rollback().expect("rollback");
                } else {
                    t.commit().expect("commit");
                }
            }
        }));
    }
    // Read continuously while they write, as the watcher does.
    let mut got = Vec::new();
    let mut after = 0;
    let reader_src = src.clone();
    while handles.iter().any(|h| !h.is_finished()) {
        let batch = reader_src.read_after(after, 13).expect("read");
        if let Some(l) = batch.last() {
            after = l.seq;
        }
        got.extend(batch);
    }
    for h in handles {
        h.join().expect("writer");
    }
    common::poll_blocking("the tail to be read", Duration::from_secs(10), || {
        let batch = src.read_after(after, 1000).expect("read");
        if let Some(l) = batch.last() {
            after = l.seq;
        }
        got.extend(batch);
        let committed: i64 = db
            .client()
            .query_one("SELECT count(*) FROM payments", &[])
            .expect("q")
            .get(0);
        got.len() as i64 == committed
    });
    let mut c = db.client();
    let committed: Vec<i64> = c
        .query("SELECT seq FROM tether.outbox ORDER BY seq", &[])
        .expect("q")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let read: Vec<i64> = got.iter().map(|e| e.seq as i64).collect();
    assert_eq!(
        read, committed,
        "every committed row read exactly once, in order"
    );
    assert!(committed.len() >= writers * per * 9 / 10);
}

#[test]
fn applied_updates_are_not_echoed_and_redelivery_changes_nothing() {
    let db = TestDb::new();
    pg::install(&db.url, &tables(ConflictPolicy::CloudWins)).expect("install");
    let sink = PgSink::open(&db.url, &tables(ConflictPolicy::CloudWins)).expect("sink");
    let u1 = update(
        "u1",
        UpdateOp::Upsert,
        5,
        Some(
            json!({"id": 5, "name": "first", "dob": "1990-05-06", "balance": 3.25, "external": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "seen_at": "2026-01-01T00:00:00+02:00", "active": true, "photo": "AQI="}),
        ),
    );
    let u2 = update(
        "u2",
        UpdateOp::Upsert,
        5,
        Some(json!({"id": 5, "name": "second"})),
    );
    assert_eq!(sink.apply(&u1).expect("u1").status, UpdateStatus::Applied);
    assert_eq!(sink.apply(&u2).expect("u2").status, UpdateStatus::Applied);
    let again = sink.apply(&u1).expect("u1 again");
    assert!(again.duplicate);
    let mut c = db.client();
    let row = c
        .query_one("SELECT name, dob::text, balance::text, external::text, active, encode(photo, 'hex') FROM patients WHERE id = 5", &[])
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "second");
    assert_eq!(row.get::<_, String>(1), "1990-05-06");
    assert_eq!(row.get::<_, String>(2), "3.25");
    assert_eq!(
        row.get::<_, String>(3),
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    );
    assert!(row.get::<_, bool>(4));
    assert_eq!(row.get::<_, String>(5), "0102");
    let src = PgSource::open(&db.url, &[]).expect("source");
    assert!(
        read_all(&src).is_empty(),
        "nothing the applier wrote was captured"
    );
    c.execute("UPDATE patients SET name = 'local' WHERE id = 5", &[])
        .expect("local");
    assert_eq!(
        read_all(&src).len(),
        1,
        "the clinic's own write is captured"
    );
    assert_eq!(
        sink.apply(&update("u3", UpdateOp::Delete, 5, None))
            .expect("delete")
            .status,
        UpdateStatus::Applied
    );
    assert_eq!(read_all(&src).len(), 1);
}

#[test]
fn each_conflict_policy_is_applied_and_recorded() {
    for policy in [
        ConflictPolicy::CloudWins,
        ConflictPolicy::ClinicWins,
        ConflictPolicy::NewestWins,
    ] {
        let db = TestDb::new();
        pg::install(&db.url, &tables(policy)).expect("install");
        let sink = PgSink::open(&db.url, &tables(policy)).expect("sink");
        let mut c = db.client();
        c.execute(
            "INSERT INTO patients (id, name, version) VALUES (1, 'clinic', 5)",
            &[],
        )
        .expect("local");
        let out = sink
            .apply(&update(
                "u1",
                UpdateOp::Upsert,
                1,
                Some(json!({"id": 1, "name": "cloud", "version": 4})),
            ))
            .expect("apply");
        let name: String = c
            .query_one("SELECT name FROM patients WHERE id = 1", &[])
            .expect("q")
            .get(0);
        let conflicts: i64 = c
            .query_one("SELECT count(*) FROM tether.conflicts", &[])
            .expect("q")
            .get(0);
        match policy {
            ConflictPolicy::CloudWins => {
                assert_eq!(
                    (out.status, name.as_str(), conflicts),
                    (UpdateStatus::Applied, "cloud", 0)
                );
            }
            ConflictPolicy::ClinicWins | ConflictPolicy::NewestWins => {
                assert_eq!(
                    (out.status, name.as_str(), conflicts),
                    (UpdateStatus::Conflict, "clinic", 1),
                    "{policy:?}"
                );
                let status: String = c
                    .query_one(
                        "SELECT status FROM tether.inbox WHERE update_id = 'u1'",
                        &[],
                    )
                    .expect("q")
                    .get(0);
                assert_eq!(status, "conflict");
            }
        }
        // After the clinic's change is acknowledged (clinic_wins) or with a newer version
        // (newest_wins), the cloud may write.
        PgCheckpoint::open(&db.url)
            .expect("cp")
            .save(1)
            .expect("save");
        let out = sink
            .apply(&update(
                "u2",
                UpdateOp::Upsert,
                1,
                Some(json!({"id": 1, "name": "cloud2", "version": 6})),
            ))
            .expect("apply");
        assert_eq!(out.status, UpdateStatus::Applied, "{policy:?}");
    }
}

#[test]
fn a_poison_update_is_parked_while_others_proceed() {
    let db = TestDb::new();
    pg::install(&db.url, &tables(ConflictPolicy::CloudWins)).expect("install");
    let sink = PgSink::open(&db.url, &tables(ConflictPolicy::CloudWins)).expect("sink");
    let results: Vec<UpdateStatus> = [
        update(
            "a",
            UpdateOp::Upsert,
            1,
            Some(json!({"id": 1, "name": "ok"})),
        ),
        update(
            "b",
            UpdateOp::Upsert,
            2,
            Some(json!({"id": 2, "name": null})),
        ),
        update(
            "c",
            UpdateOp::Upsert,
            3,
            Some(json!({"id": 3, "name": "x", "dob": "not a date"})),
        ),
        update(
            "d",
            UpdateOp::Upsert,
            4,
            Some(json!({"id": 4, "name": "x", "colour": "red"})),
        ),
        update(
            "e",
            UpdateOp::Upsert,
            5,
            Some(json!({"id": 5, "name": "ok too"})),
        ),
    ]
    .iter()
    .map(|u| sink.apply(u).expect("apply").status)
    .collect();
    assert_eq!(
        results,
        vec![
            UpdateStatus::Applied,
            UpdateStatus::Failed,
            UpdateStatus::Failed,
            UpdateStatus::Failed,
            UpdateStatus::Applied
        ]
    );
    let n: i64 = db
        .client()
        .query_one("SELECT count(*) FROM patients", &[])
        .expect("q")
        .get(0);
    assert_eq!(n, 2);
}

#[test]
fn snapshot_with_live_changes_interleaved_keeps_per_key_order() {
    let db = TestDb::new();
    let t = tables(ConflictPolicy::CloudWins);
    pg::install(&db.url, &t).expect("install");
    let mut c = db.client();
    c.batch_execute(
        "SET session_replication_role = replica; \
        INSERT INTO patients (id, name) SELECT g, 'row ' || g FROM generate_series(1, 300) g; \
        SET session_replication_role = origin;",
    )
    .expect("preexisting rows (not captured)");
    let url = db.url.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&url, NoTls).expect("connect");
        for i in 0..150i64 {
            let id = 1 + (i * 7) % 300;
            c.execute(
                "UPDATE patients SET name = 'live ' || $2, version = version + 1 WHERE id = $1",
                &[&id, &i.to_string()],
            )
            .expect("live update");
        }
    });
    let mut progress = Vec::new();
    let p = pg::snapshot(&db.url, &t[0], 25, &mut |p| progress.push(p.done)).expect("snapshot");
    writer.join().expect("writer");
    assert_eq!(p.done, 300);
    assert!(progress.len() >= 12, "{progress:?}");
    let again = pg::snapshot(&db.url, &t[0], 25, &mut |_| {}).expect("finished snapshot");
    assert_eq!(again.done, 300, "a finished snapshot is not repeated");
    // History check: for every key, the last event read equals the row as it is now.
    let src = PgSource::open(&db.url, &[]).expect("source");
    let events = read_all(&src);
    let mut last: HashMap<i64, Value> = HashMap::new();
    let mut snap_keys = Vec::new();
    for e in &events {
        let id = e.key["id"].as_i64().expect("id");
        if e.op == Op::Update && e.row.as_ref().is_some_and(|r| r["version"] == json!(1)) {
            snap_keys.push(id);
        }
        last.insert(id, Value::Object(e.row.clone().unwrap_or_default()));
    }
    assert_eq!(last.len(), 300, "every row sent");
    for r in c
        .query("SELECT id, name, version FROM patients", &[])
        .expect("rows")
    {
        let id: i64 = r.get(0);
        let want = (r.get::<_, String>(1), r.get::<_, i32>(2));
        let got = &last[&id];
        assert_eq!(
            (
                got["name"].as_str().map(str::to_string),
                got["version"].as_i64()
            ),
            (Some(want.0), Some(want.1 as i64)),
            "key {id}"
        );
    }
}

/// Runs `f` with a fresh client on a plain thread: the synchronous client must not block a
/// runtime thread.
fn pg_blocking<T: Send + 'static>(
    url: &str,
    f: impl FnOnce(&mut Client) -> T + Send + 'static,
) -> T {
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut c = Client::connect(&url, NoTls).expect("connect");
        f(&mut c)
    })
    .join()
    .expect("pg thread")
}

/// The highest outbox seq (`i64::MAX` while the database cannot be read).
fn outbox_head(url: &str) -> i64 {
    pg_blocking(url, |c| {
        c.query_one("SELECT coalesce(max(seq), 0) FROM tether.outbox", &[])
            .map(|r| r.get(0))
            .unwrap_or(i64::MAX)
    })
}

/// The number of rows in the outbox (`0` while the database cannot be read).
fn outbox_count(url: &str) -> i64 {
    pg_blocking(url, |c| {
        c.query_one("SELECT count(*) FROM tether.outbox", &[])
            .map(|r| r.get(0))
            .unwrap_or(0)
    })
}

/// One event as (seq, op, key, row).
type Ev = (i64, String, Value, Option<Value>);

/// The history check's two sides: the clinic's outbox and what the gateway holds for the clinic,
/// both in seq order.
fn outbox_and_gateway(
    url: &str,
    store: &tether::gateway::store::Store,
    clinic: &str,
) -> (Vec<Ev>, Vec<Ev>) {
    let outbox: Vec<Ev> = pg_blocking(url, |c| {
        c.query(
            "SELECT seq, op, key_json, row_json FROM tether.outbox ORDER BY seq",
            &[],
        )
        .expect("outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
    });
    let at_gateway: Vec<Ev> =
        tether::gateway::store::wait(store.events_page(Some(clinic), 0, 10_000))
            .expect("events")
            .into_iter()
            .map(|e| (e.seq as i64, e.op, e.key, e.row))
            .collect();
    (outbox, at_gateway)
}

/// End to end: an agent on PostgreSQL syncing through a gateway, ending with the history check
/// (the gateway holds exactly the clinic's outbox, in order) and a cloud update applied once
/// and not echoed.
#[test]
fn agent_on_postgres_syncs_through_the_gateway() {
    let db = TestDb::new();
    let url = db.url.clone();
    actix::System::new().block_on(e2e(url, false, "triggers"));
    drop(db);
}

/// The same while every connection the agent holds is killed (`pg_terminate_backend`) three
/// times mid-stream: its ports reconnect and nothing is lost or applied twice.
#[test]
fn agent_on_postgres_heals_when_its_connections_are_killed_mid_stream() {
    let db = TestDb::new();
    let url = db.url.clone();
    actix::System::new().block_on(e2e(url, true, "triggers"));
    drop(db);
}

async fn e2e(url: String, kill_connections: bool, capture: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = tether::gateway::start(
        tether::gateway::GatewaySettings {
            node_id: None,
            advertise: None,
            listen: "127.0.0.1:0".into(),
            store: tether::gateway::store::StoreLocation::Sqlite(dir.path().join("gateway.db")),
            retention: None,
            heartbeat_interval: Duration::from_millis(500),
            max_frame_bytes: 1 << 20,
            entity_schemas: None,
            update_window: 8,
            group_commit_max_events: 1000,
            workers: 1,
            shutdown_timeout: Duration::from_millis(200),
            faults: Default::default(),
            webhooks: Vec::new(),
            bridge: Default::default(),
            channels: Vec::new(),
        },
        tether::gateway::GatewaySecurity::insecure(),
    )
    .expect("gateway");
    let yaml = format!(
        "agent:\n  clinic_id: clinic-pg\n  database:\n    kind: postgres\n    capture: {capture}\n    connection: \"{}\"\n  gateway:\n    url: {}\n    insecure_plaintext: true\n    heartbeat_interval: 500ms\n    backoff: {{initial: 50ms, max: 500ms}}\n  outbox:\n    poll_interval: 20ms\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n    - {{table: payments, entity: payment, key: [id], direction: up}}\n",
        url,
        gw.ws_url()
    );
    let cfg = tether::config::Config::parse(&yaml, "test")
        .expect("config")
        .agent
        .expect("agent");
    let c = cfg.clone();
    let installed =
        std::thread::spawn(move || tether::agent::install(&c).map_err(|e| e.to_string()))
            .join()
            .expect("join");
    println!("{}", installed.expect("install"));
    let agent = tether::fleet::start_agent(&cfg).await.expect("agent");
    let sessions = || {
        pg_blocking(&url, |c| {
            c.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
        })
    };
    if kill_connections {
        common::wait_until("the agent's connections", Duration::from_secs(10), || {
            let n = sessions();
            async move { n >= 2 }
        })
        .await;
    }
    let writer_url = url.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&writer_url, NoTls).expect("connect");
        let mut killed = 0i64;
        for i in 0..200i64 {
            if kill_connections && i % 60 == 30 {
                killed += c
                    .query_one(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE datname = current_database() AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .expect("terminate")
                    .get::<_, i64>(0);
            }
            let mut t = c.transaction().expect("begin");
            t.execute("INSERT INTO patients (id, name) VALUES ($1, 'p') ON CONFLICT (id) DO UPDATE SET name = 'again'", &[&(i % 120)]).expect("w");
            t.execute(
                "INSERT INTO payments (patient_id, amount_cents) VALUES ($1, 100)",
                &[&i],
            )
            .expect("w");
            t.commit().expect("commit");
        }
        killed
    });
    let body = json!({"entity": "patient", "op": "upsert", "key": {"id": -7}, "row": {"id": -7, "name": "from the cloud"}});
    let (status, v) = common::post_json(
        &format!("{}/v1/clinics/clinic-pg/updates", gw.http_url()),
        &body,
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let killed = writer.join().expect("writer");
    assert!(
        !kill_connections || killed >= 2,
        "the agent's connections were killed: {killed}"
    );
    let store = gw.store.clone();
    common::wait_until(
        "the PostgreSQL outbox to be acknowledged",
        Duration::from_secs(30),
        || {
            // With logical capture the outbox fills after the commit: wait for all of it.
            let captured = outbox_count(&url) >= 400;
            let head = outbox_head(&url);
            let acked =
                tether::gateway::store::wait(store.acked_seq("clinic-pg")).unwrap_or(0) as i64;
            let applied = common::gateway_db_count(
                &dir.path().join("gateway.db"),
                "SELECT count(*) FROM updates WHERE status = 'applied'",
            );
            async move { captured && head > 0 && acked >= head && applied == 1 }
        },
    )
    .await;
    // History check: the gateway holds exactly the clinic's outbox, same order, same content.
    let (clinic, at_gateway) = outbox_and_gateway(&url, gw.store.as_ref(), "clinic-pg");
    assert_eq!(clinic.len(), 400, "every clinic commit captured once");
    assert_eq!(
        at_gateway, clinic,
        "lost, duplicated, reordered or altered events"
    );
    let name: String = pg_blocking(&url, |c| {
        c.query_one("SELECT name FROM patients WHERE id = -7", &[])
            .expect("applied")
            .get(0)
    });
    assert_eq!(name, "from the cloud");
    assert!(
        !clinic.iter().any(|e| e.2 == json!({"id": -7})),
        "the cloud update was not echoed"
    );
    agent.stop();
    gw.stop().await;
}

/// Reads continuously (as the watcher does) until `done`, recording when each seq arrived.
fn read_with_arrivals(src: &PgSource, done: &dyn Fn() -> bool) -> HashMap<u64, std::time::Instant> {
    let mut arrived = HashMap::new();
    let mut after = 0;
    loop {
        let finished = done();
        let batch = src.read_after(after, 500).expect("read");
        let now = std::time::Instant::now();
        for e in &batch {
            arrived.insert(e.seq, now);
        }
        if let Some(l) = batch.last() {
            after = l.seq;
        }
        if finished && batch.is_empty() {
            return arrived;
        }
        // The watcher's poll interval.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn overlapping_long_transactions_hold_a_change_back_only_while_they_are_open() {
    let db = TestDb::new();
    pg::install(&db.url, &tables(ConflictPolicy::CloudWins)).expect("install");
    let src = PgSource::open(&db.url, &[]).expect("source");
    // Eight seconds of load: the writers stop at this deadline.
    let until = std::time::Instant::now() + Duration::from_secs(8);
    // A long transaction (1.2 s) begins every 300 ms, so one is always open; some roll back.
    let long_writer = {
        let url = db.url.clone();
        std::thread::spawn(move || {
            let mut open = Vec::new();
            let mut i = 0;
            while std::time::Instant::now() < until {
                let url = url.clone();
                open.push(std::thread::spawn(move || {
                    let mut c = Client::connect(&url, NoTls).expect("connect");
                    let mut t = c.transaction().expect("begin");
                    t.execute(
                        "INSERT INTO payments (patient_id, amount_cents) VALUES (1, 1)",
                        &[],
                    )
                    .expect("long insert");
                    // Pacing the writer: the transaction stays open 1.2 s.
                    std::thread::sleep(Duration::from_millis(1200));
                    if i % 4 == 3 {
                        t.rollback().expect("rollback");
                    } else {
                        t.commit().expect("commit");
                    }
                }));
                i += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            for h in open {
                h.join().expect("long txn");
            }
        })
    };
    // Short transactions every 20 ms, each noting when it committed.
    let short_writer = {
        let url = db.url.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&url, NoTls).expect("connect");
            let mut committed = Vec::new();
            while std::time::Instant::now() < until {
                let mut t = c.transaction().expect("begin");
                t.execute(
                    "INSERT INTO payments (patient_id, amount_cents) VALUES (0, 1)",
                    &[],
                )
                .expect("short insert");
                let seq: i64 = t
                    .query_one("SELECT currval('tether.outbox_seq_seq')", &[])
                    .expect("seq")
                    .get(0);
                t.commit().expect("commit");
                committed.push((seq as u64, std::time::Instant::now()));
                std::thread::sleep(Duration::from_millis(20));
            }
            committed
        })
    };
    let started = std::time::Instant::now();
    let arrived = read_with_arrivals(&src, &|| {
        long_writer.is_finished() && short_writer.is_finished()
    });
    long_writer.join().expect("long writer");
    let committed = short_writer.join().expect("short writer");
    assert!(committed.len() > 100, "{} short commits", committed.len());
    let mut worst = Duration::ZERO;
    for (seq, at) in &committed {
        let got = arrived
            .get(seq)
            .unwrap_or_else(|| panic!("short commit {seq} never read"));
        worst = worst.max(got.saturating_duration_since(*at));
    }
    // The longest transaction is open 1.2 s; a change may wait for the ones open when it
    // committed, plus a read or two, never for the load to stop.
    assert!(
        worst < Duration::from_millis(2_500),
        "a change waited {worst:?} (load ran {:?})",
        started.elapsed()
    );
}

/// A gap of two missing seqs: a long transaction's and a rolled-back one's. When the long one
/// commits, the rolled-back seq must not count as a new hole (it would then wait for a long
/// transaction that began after the change behind it had committed).
#[test]
fn a_hole_left_behind_a_committed_long_transaction_keeps_its_age() {
    let db = TestDb::new();
    pg::install(&db.url, &tables(ConflictPolicy::CloudWins)).expect("install");
    let src = PgSource::open(&db.url, &[]).expect("source");
    let insert = "INSERT INTO payments (patient_id, amount_cents) VALUES ($1, 1)";
    let mut c1 = db.client();
    let mut long1 = c1.transaction().expect("begin");
    long1.execute(insert, &[&1i64]).expect("seq 1, held");
    let mut c2 = db.client();
    let mut r = c2.transaction().expect("begin");
    r.execute(insert, &[&2i64]).expect("seq 2");
    r.rollback().expect("rolled back: seq 2 never comes");
    let mut c = db.client();
    c.execute(insert, &[&3i64]).expect("seq 3, committed");
    assert!(
        src.read_after(0, 100).expect("read").is_empty(),
        "seq 1 may still come"
    );
    // A long transaction that begins after seq 3 committed.
    let mut c4 = db.client();
    let mut long2 = c4.transaction().expect("begin");
    long2.execute(insert, &[&4i64]).expect("seq 4, held");
    long1.commit().expect("commit seq 1");
    let mut got = Vec::new();
    common::poll_blocking(
        "seq 3 while a transaction younger than it stays open",
        Duration::from_secs(5),
        || {
            got = src.read_after(0, 100).expect("read");
            got.len() >= 2
        },
    );
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 3]);
    long2.commit().expect("commit");
}

/// While a change waits behind a hole (a long transaction), the agent's status counts it and
/// stops saying ready once it is older than `ready_lag`, though the link is up.
#[test]
fn status_says_behind_while_a_committed_change_waits_behind_a_long_transaction() {
    let db = TestDb::new();
    pg::install(&db.url, &tables(ConflictPolicy::CloudWins)).expect("install");
    let mut c1 = db.client();
    let mut long = c1.transaction().expect("begin");
    long.execute(
        "INSERT INTO payments (patient_id, amount_cents) VALUES (1, 1)",
        &[],
    )
    .expect("seq 1, held");
    db.client()
        .execute(
            "INSERT INTO payments (patient_id, amount_cents) VALUES (2, 1)",
            &[],
        )
        .expect("seq 2, committed");
    let stats = Arc::new(tether_actors::stats::AgentStats::default());
    stats
        .connected
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let state = Arc::new(tether::admin::AdminState {
        clinic_id: "clinic-st".into(),
        gateway_url: "ws://127.0.0.1:9/v1/ws".into(),
        proxy: "none".into(),
        stats,
        source: Arc::new(PgSource::open(&db.url, &[]).expect("source")),
        checkpoint: Arc::new(PgCheckpoint::open(&db.url).expect("checkpoint")),
        started: std::time::Instant::now(),
        ready_lag: Duration::from_secs(1),
        slots: None,
        certificate: None,
        channels: None,
    });
    actix::System::new().block_on(async move {
        let first = state.status().await;
        assert_eq!(first.backlog_events, 1, "{first:?}");
        assert!(first.connected);
        common::wait_until("status to say behind", Duration::from_secs(10), || {
            let s = state.clone();
            async move {
                let st = s.status().await;
                !st.ready
                    && st
                        .not_ready
                        .as_deref()
                        .is_some_and(|r| r.starts_with("behind"))
            }
        })
        .await;
    });
    long.commit().expect("commit");
}

#[test]
fn an_open_transaction_in_another_database_does_not_hold_a_clinic_back() {
    let db = TestDb::new();
    let other = TestDb::new();
    pg::install(&db.url, &tables(ConflictPolicy::CloudWins)).expect("install");
    let src = PgSource::open(&db.url, &[]).expect("source");
    // Another database on the same server: a transaction with an id, held open.
    let mut oc = other.client();
    let mut ot = oc.transaction().expect("begin");
    ot.execute("INSERT INTO scratch VALUES (1)", &[])
        .expect("takes a txid");
    // A hole in the clinic's outbox (a rolled-back transaction), then committed rows.
    let mut c = db.client();
    let mut t = c.transaction().expect("begin");
    t.execute("INSERT INTO patients (id, name) VALUES (1, 'gone')", &[])
        .expect("seq 1");
    t.rollback().expect("rollback");
    for id in 2..=4 {
        c.execute(
            "INSERT INTO patients (id, name) VALUES ($1, 'kept')",
            &[&(id as i64)],
        )
        .expect("insert");
    }
    // What is committed and not acknowledged is the backlog, whether or not it can be read
    // yet (the status must not say 0 while changes wait behind a hole).
    let b = src.backlog(0).expect("backlog");
    assert_eq!(b.events, 3, "{b:?}");
    assert!(
        b.oldest_committed_at
            .as_deref()
            .is_some_and(|t| t.ends_with('Z')),
        "{b:?}"
    );
    let mut got = Vec::new();
    common::poll_blocking(
        "the clinic's rows while another database's transaction stays open",
        Duration::from_secs(10),
        || {
            got = src.read_after(0, 100).expect("read");
            !got.is_empty()
        },
    );
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3, 4]);
    ot.commit().expect("commit other");
}

/// A PostgreSQL server of this test's own (`initdb` + `pg_ctl` in a temporary directory, on a
/// free port, run as the `postgres` system user), so the test can restart it.
struct PrivatePg {
    dir: tempfile::TempDir,
    port: u16,
    bin: std::path::PathBuf,
    /// Extra server settings (`-c name=value …`).
    settings: String,
}

impl PrivatePg {
    fn start() -> PrivatePg {
        Self::start_with("")
    }

    /// A server with `wal_level = logical` (for `capture: logical`).
    fn start_logical() -> PrivatePg {
        Self::start_with("-c wal_level=logical")
    }

    fn start_with(settings: &str) -> PrivatePg {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql (Debian's postgresql)")
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = common::procs::free_port();
        let pg = PrivatePg {
            dir,
            port,
            bin,
            settings: settings.to_string(),
        };
        // initdb refuses to run as root: the server runs as the `postgres` system user then.
        if running_as_root() {
            pg.run_as_postgres(&["chown", "-R", "postgres", &pg.path("")], true);
        }
        pg.run_as_postgres(
            &[
                &pg.tool("initdb"),
                "-D",
                &pg.path("data"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            false,
        );
        pg.ctl("start");
        pg
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn tool(&self, name: &str) -> String {
        self.bin.join(name).display().to_string()
    }

    fn run_as_postgres(&self, args: &[&str], as_root: bool) {
        let mut cmd = postgres_command(args, as_root);
        let out = cmd
            .stdout(std::process::Stdio::null())
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start|stop|restart`, waiting until it is done.
    fn ctl(&self, action: &str) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {}",
            self.port,
            self.path(""),
            self.settings
        );
        self.run_as_postgres(
            &[
                &self.tool("pg_ctl"),
                "-D",
                &self.path("data"),
                "-o",
                &opts,
                "-l",
                &self.path("server.log"),
                "-m",
                "fast",
                "-w",
                action,
            ],
            false,
        );
    }

    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let (ctl, data) = (self.tool("pg_ctl"), self.path("data"));
        let stop = [ctl.as_str(), "-D", &data, "-m", "immediate", "stop"];
        let _ = postgres_command(&stop, false).output();
    }
}

/// `args` as a command, run as the `postgres` system user when this test runs as root (unless
/// `as_root`).
fn postgres_command(args: &[&str], as_root: bool) -> std::process::Command {
    if as_root || !running_as_root() {
        let mut c = std::process::Command::new(args[0]);
        c.args(&args[1..]);
        c
    } else {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).args(args);
        c
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The server itself restarts mid-stream (twice): the agent's ports reconnect on their own,
/// and the gateway ends up with exactly the clinic's outbox.
#[test]
fn agent_on_postgres_comes_back_after_the_server_restarts_mid_stream() {
    let pg = PrivatePg::start();
    let url = pg.url();
    {
        let mut c = Client::connect(&url, NoTls).expect("private server");
        c.batch_execute(
            "CREATE TABLE patients (id bigint PRIMARY KEY, name text NOT NULL);
             CREATE TABLE payments (id bigserial PRIMARY KEY, patient_id bigint NOT NULL, amount_cents int NOT NULL);",
        )
        .expect("schema");
    }
    actix::System::new().block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = tether::gateway::start(
            common::gateway_settings(dir.path(), Duration::from_millis(500)),
            tether::gateway::GatewaySecurity::insecure(),
        )
        .expect("gateway");
        let yaml = format!(
            "agent:\n  clinic_id: clinic-pr\n  database:\n    kind: postgres\n    connection: \"{url}\"\n  gateway:\n    url: {}\n    insecure_plaintext: true\n    heartbeat_interval: 500ms\n    backoff: {{initial: 50ms, max: 500ms}}\n  outbox:\n    poll_interval: 20ms\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n    - {{table: payments, entity: payment, key: [id], direction: up}}\n",
            gw.ws_url()
        );
        let cfg = tether::config::Config::parse(&yaml, "test")
            .expect("config")
            .agent
            .expect("agent");
        let c = cfg.clone();
        std::thread::spawn(move || tether::agent::install(&c).map_err(|e| e.to_string()))
            .join()
            .expect("join")
            .expect("install");
        let agent = tether::fleet::start_agent(&cfg).await.expect("agent");
        // The writer commits 300 transactions, reconnecting whenever the server is away.
        let writer_url = url.clone();
        let writer = std::thread::spawn(move || {
            let mut done = 0i64;
            let mut client: Option<Client> = None;
            while done < 300 {
                let c = match client.as_mut() {
                    Some(c) if !c.is_closed() => c,
                    _ => {
                        client = Client::connect(&writer_url, NoTls).ok();
                        if client.is_none() {
                            // Pacing the retries while the server restarts.
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        continue;
                    }
                };
                if c
                    .execute(
                        "INSERT INTO payments (patient_id, amount_cents) VALUES ($1, 100)",
                        &[&done],
                    )
                    .is_ok()
                {
                    done += 1;
                }
                // About 100 commits per second.
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let store = gw.store.clone();
        for _ in 0..2 {
            let before = tether::gateway::store::wait(store.acked_seq("clinic-pr")).unwrap_or(0);
            common::wait_until("progress before the restart", Duration::from_secs(20), || {
                let a = tether::gateway::store::wait(store.acked_seq("clinic-pr")).unwrap_or(0);
                async move { a > before + 20 }
            })
            .await;
            pg.ctl("restart");
        }
        writer.join().expect("writer");
        common::wait_until(
            "everything acknowledged after the restarts",
            Duration::from_secs(30),
            || {
                let head = outbox_head(&url);
                let acked = tether::gateway::store::wait(store.acked_seq("clinic-pr")).unwrap_or(0) as i64;
                async move { head >= 300 && acked >= head }
            },
        )
        .await;
        let (clinic, at_gateway) = outbox_and_gateway(&url, gw.store.as_ref(), "clinic-pr");
        // A commit whose answer was lost in a restart is retried by the writer, so count what
        // the table holds rather than what the writer attempted.
        let committed: i64 = pg_blocking(&url, |c| {
            c.query_one("SELECT count(*) FROM payments", &[])
                .expect("count")
                .get(0)
        });
        assert!(committed >= 300, "{committed}");
        assert_eq!(clinic.len() as i64, committed, "every commit captured once");
        assert_eq!(at_gateway, clinic, "lost, duplicated or reordered events");
        agent.stop();
        gw.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// Logical capture (`capture: logical`): a private server with `wal_level = logical`.

const CLINIC_SCHEMA: &str =
    "CREATE TABLE patients (id bigint PRIMARY KEY, name text NOT NULL, dob date, balance numeric(10,2), \
       photo bytea, external uuid, seen_at timestamptz, active boolean, version int NOT NULL DEFAULT 1);
     CREATE TABLE payments (id bigserial PRIMARY KEY, patient_id bigint NOT NULL, amount_cents int NOT NULL);
     CREATE TABLE notes (id int PRIMARY KEY, body text, meta jsonb, tags int[]);
     CREATE TABLE scratch (id int);";

/// A database with the clinic schema on a private server; its connection string.
fn private_db(pg: &PrivatePg, name: &str) -> String {
    let mut admin = Client::connect(&pg.url(), NoTls).expect("private server");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create database");
    let url = pg
        .url()
        .replace("dbname=postgres", &format!("dbname={name}"));
    Client::connect(&url, NoTls)
        .expect("connect")
        .batch_execute(CLINIC_SCHEMA)
        .expect("schema");
    url
}

fn logical_tables() -> Vec<TableConfig> {
    let mut t = tables(ConflictPolicy::CloudWins);
    t.push(TableConfig::new("notes", "note", &["id"], Direction::Up));
    t
}

/// (entity, op, key, row): what an event means, without its position and time.
fn meaning(events: &[tether_schemas::Event]) -> Vec<(String, Op, Value, Option<Value>)> {
    events
        .iter()
        .map(|e| {
            (
                e.entity.clone(),
                e.op,
                Value::Object(e.key.clone()),
                e.row.clone().map(Value::Object),
            )
        })
        .collect()
}

/// Every kind of change a clinic makes: types, multi-row statements, rollbacks, savepoints, a
/// key change, an unchanged large (TOASTed) value, deletes.
fn clinic_script(c: &mut Client) {
    // One simple query per transaction: in a multi-statement query, a ROLLBACK would undo the
    // statements before its BEGIN too.
    for batch in [
        "INSERT INTO patients VALUES (1, 'Ann', '1980-02-03', 12.50, '\\x0102', \
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-12-01 10:00:00+00', true, 1)",
        "INSERT INTO payments (patient_id, amount_cents) SELECT g, g * 10 FROM generate_series(1, 5) g",
        "BEGIN; INSERT INTO patients (id, name) VALUES (2, 'rolled back'); ROLLBACK",
        "BEGIN; INSERT INTO patients (id, name) VALUES (3, 'Bo'); SAVEPOINT s; \
           UPDATE patients SET name = 'undone' WHERE id = 3; ROLLBACK TO s; \
           UPDATE patients SET active = false WHERE id = 3; COMMIT",
        "UPDATE patients SET id = 10 WHERE id = 1",
        "INSERT INTO notes VALUES (1, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g), \
           '{\"a\": [1, 2]}', '{1,2,3}')",
        "UPDATE notes SET meta = '{\"b\": true}' WHERE id = 1",
        "DELETE FROM notes WHERE id = 1",
        "DELETE FROM payments WHERE patient_id <= 2",
        "UPDATE patients SET balance = NULL, photo = NULL WHERE id = 10",
    ] {
        c.batch_execute(batch).expect("clinic script");
    }
}

#[test]
fn logical_capture_means_the_same_as_triggers_without_a_trigger() {
    let pg = PrivatePg::start_logical();
    let by_slot = private_db(&pg, "by_slot");
    let by_trigger = private_db(&pg, "by_trigger");
    let t = logical_tables();
    assert_eq!(
        pg::logical::install(&by_slot, &t).expect("install logical"),
        3
    );
    pg::install(&by_trigger, &t).expect("install triggers");
    let triggers: i64 = Client::connect(&by_slot, NoTls)
        .expect("connect")
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'tether_capture'",
            &[],
        )
        .expect("triggers")
        .get(0);
    assert_eq!(triggers, 0, "logical capture installs no trigger");
    clinic_script(&mut Client::connect(&by_slot, NoTls).expect("connect"));
    clinic_script(&mut Client::connect(&by_trigger, NoTls).expect("connect"));
    let logical = read_all(&PgSource::open_logical(&by_slot, &t, 1 << 30).expect("source"));
    // The trigger mode passes a rolled-back hole on a later read: read until all are in.
    let trigger_src = PgSource::open(&by_trigger, &t).expect("source");
    let mut triggered = Vec::new();
    common::poll_blocking("the trigger mode's events", Duration::from_secs(10), || {
        let after = triggered
            .last()
            .map_or(0, |e: &tether_schemas::Event| e.seq);
        triggered.extend(trigger_src.read_after(after, 100).expect("read"));
        triggered.len() >= 16
    });
    assert_eq!(triggered.len(), 16, "{:#?}", meaning(&triggered));
    assert_eq!(meaning(&logical), meaning(&triggered));
    // Both in the wire form (docs/PROTOCOL.md "Values"): exact decimal string, base64, UTC.
    let first = logical[0].row.clone().map(Value::Object);
    assert_eq!(
        first,
        Some(
            json!({"id": 1, "name": "Ann", "dob": "1980-02-03", "balance": "12.5",
                    "photo": "AQI=", "external": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                    "seen_at": "2026-12-01T10:00:00Z", "active": true, "version": 1})
        )
    );
    // In commit order, without holes: one writer fills the outbox.
    let seqs: Vec<u64> = logical.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=16).collect::<Vec<u64>>());
    // The large value left unchanged by the update is whole, not missing.
    let note_update = logical
        .iter()
        .find(|e| e.entity == "note" && e.op == Op::Update)
        .expect("note update");
    let body = note_update.row.as_ref().and_then(|r| r.get("body"));
    assert_eq!(body.and_then(Value::as_str).map(str::len), Some(12_800));
    assert!(logical.iter().all(|e| e.committed_at.ends_with('Z')));
}

#[test]
fn logical_capture_is_not_held_back_by_a_long_transaction() {
    let pg = PrivatePg::start_logical();
    let url = private_db(&pg, "clinic");
    let t = logical_tables();
    pg::logical::install(&url, &t).expect("install");
    let src = PgSource::open_logical(&url, &t, 1 << 30).expect("source");
    let mut long_c = Client::connect(&url, NoTls).expect("connect");
    let mut long = long_c.transaction().expect("begin");
    long.execute(
        "INSERT INTO payments (patient_id, amount_cents) VALUES (-1, 1)",
        &[],
    )
    .expect("long insert");
    let mut c = Client::connect(&url, NoTls).expect("connect");
    for i in 0..20i64 {
        c.execute(
            "INSERT INTO payments (patient_id, amount_cents) VALUES ($1, 1)",
            &[&i],
        )
        .expect("short insert");
    }
    let mut got = Vec::new();
    common::poll_blocking(
        "the short commits while the long transaction is still open",
        Duration::from_secs(5),
        || {
            got.extend(src.read_after(got.len() as u64, 100).expect("read"));
            got.len() >= 20
        },
    );
    assert_eq!(got.len(), 20);
    long.commit().expect("commit long");
    common::poll_blocking(
        "the long transaction's change",
        Duration::from_secs(5),
        || {
            got.extend(src.read_after(got.len() as u64, 100).expect("read"));
            got.len() >= 21
        },
    );
    let last = got
        .last()
        .and_then(|e| e.row.as_ref())
        .and_then(|r| r.get("patient_id"));
    assert_eq!(last, Some(&json!(-1)), "taken in commit order");
    // The backlog counts it; the slot's retained WAL is measured.
    let b = src.backlog(0).expect("backlog");
    assert_eq!(b.events, 21);
    assert!(b.capture_retained_bytes.is_some(), "{b:?}");
}

/// A crash after the outbox commit but before the slot moved: the slot gives the same
/// transactions again, and they are not stored twice.
#[test]
fn logical_capture_replayed_by_the_slot_is_not_stored_twice() {
    let pg = PrivatePg::start_logical();
    let url = private_db(&pg, "clinic");
    let t = logical_tables();
    pg::logical::install(&url, &t).expect("install");
    let mut c = Client::connect(&url, NoTls).expect("connect");
    let slot: String = c
        .query_one(
            "SELECT text_value FROM tether.state WHERE name = 'logical_slot'",
            &[],
        )
        .expect("slot")
        .get(0);
    for i in 0..5i64 {
        c.execute(
            "INSERT INTO payments (patient_id, amount_cents) VALUES ($1, 1)",
            &[&i],
        )
        .expect("insert");
    }
    // A copy of the slot still at the old position: what the slot is after such a crash.
    c.execute(
        "SELECT pg_copy_logical_replication_slot($1, 'tether_replay')",
        &[&slot],
    )
    .expect("copy slot");
    let src = PgSource::open_logical(&url, &t, 1 << 30).expect("source");
    assert_eq!(read_all(&src).len(), 5);
    c.execute(
        "INSERT INTO payments (patient_id, amount_cents) VALUES (99, 1)",
        &[],
    )
    .expect("insert");
    let mut replay = pg::logical::Pump::new("tether_replay".into(), &t, 1 << 30);
    let p = replay
        .pump(&mut c, None)
        .expect("pump from the old position");
    assert_eq!(p.transactions, 1, "only the new transaction is new: {p:?}");
    let n: i64 = c
        .query_one("SELECT count(*) FROM tether.outbox", &[])
        .expect("count")
        .get(0);
    assert_eq!(n, 6, "the five replayed changes are not stored again");
    c.execute("SELECT pg_drop_replication_slot('tether_replay')", &[])
        .expect("drop copy");
}

#[test]
fn logical_capture_does_not_echo_applied_updates() {
    let pg = PrivatePg::start_logical();
    let url = private_db(&pg, "clinic");
    let t = logical_tables();
    pg::logical::install(&url, &t).expect("install");
    let src = PgSource::open_logical(&url, &t, 1 << 30).expect("source");
    let sink = PgSink::open_with(&url, &t, true).expect("sink");
    let out = sink
        .apply(&update(
            "u-1",
            UpdateOp::Upsert,
            5,
            Some(json!({"id": 5, "name": "from the cloud"})),
        ))
        .expect("apply");
    assert_eq!(out.status, UpdateStatus::Applied);
    Client::connect(&url, NoTls)
        .expect("connect")
        .execute("UPDATE patients SET name = 'at the desk' WHERE id = 5", &[])
        .expect("local update");
    let events = read_all(&src);
    assert_eq!(events.len(), 1, "{:#?}", meaning(&events));
    assert_eq!(events[0].op, Op::Update);
    // Without the marker, the same apply would have been captured.
    let unmarked = PgSink::open_with(&url, &t, false).expect("sink");
    unmarked
        .apply(&update(
            "u-2",
            UpdateOp::Upsert,
            6,
            Some(json!({"id": 6, "name": "x"})),
        ))
        .expect("apply");
    let more = src.read_after(events[0].seq, 10).expect("read");
    assert_eq!(more.len(), 1, "the marker is what keeps applies out");
}

#[test]
fn logical_install_says_what_the_server_lacks() {
    // The shared server runs with wal_level = replica.
    let db = TestDb::new();
    let wal_level: String = db
        .client()
        .query_one("SHOW wal_level", &[])
        .expect("wal_level")
        .get(0);
    if wal_level != "logical" {
        let e = pg::logical::install(&db.url, &logical_tables_without_notes())
            .expect_err("refused")
            .to_string();
        assert!(e.contains("wal_level = logical"), "{e}");
        assert!(e.contains("ALTER SYSTEM SET wal_level = logical"), "{e}");
    }
    // A role without REPLICATION.
    let pg = PrivatePg::start_logical();
    let url = private_db(&pg, "clinic");
    Client::connect(&url, NoTls)
        .expect("connect")
        .batch_execute(
            "CREATE ROLE clinic_app LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public TO clinic_app; \
             GRANT CREATE ON DATABASE clinic TO clinic_app; ALTER TABLE patients OWNER TO clinic_app; \
             ALTER TABLE payments OWNER TO clinic_app; ALTER TABLE notes OWNER TO clinic_app;",
        )
        .expect("role");
    let e = pg::logical::install(
        &url.replace("user=postgres", "user=clinic_app"),
        &logical_tables(),
    )
    .expect_err("refused")
    .to_string();
    assert!(e.contains("ALTER ROLE \"clinic_app\" REPLICATION"), "{e}");
    // A reader whose slot was dropped says so.
    let t = logical_tables();
    pg::logical::install(&url, &t).expect("install");
    let src = PgSource::open_logical(&url, &t, 1 << 30).expect("source");
    Client::connect(&url, NoTls)
        .expect("connect")
        .batch_execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'tether\\_%'",
        )
        .expect("drop slot");
    let e = src.read_after(0, 10).expect_err("slot gone").to_string();
    assert!(e.contains("is gone"), "{e}");
}

fn logical_tables_without_notes() -> Vec<TableConfig> {
    tables(ConflictPolicy::CloudWins)
}

/// Triggers → logical → triggers while a writer commits all along: every commit is captured
/// exactly once across both switches.
#[test]
fn switching_capture_modes_under_load_loses_and_doubles_nothing() {
    let pg = PrivatePg::start_logical();
    let url = private_db(&pg, "clinic");
    let t = logical_tables();
    pg::install(&url, &t).expect("install triggers");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&url, NoTls).expect("connect");
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 300 {
                c.execute(
                    "INSERT INTO payments (patient_id, amount_cents) VALUES ($1, 1)",
                    &[&n],
                )
                .expect("insert");
                n += 1;
            }
            n
        })
    };
    let count = |url: &str| -> i64 {
        Client::connect(url, NoTls)
            .expect("connect")
            .query_one("SELECT count(*) FROM payments", &[])
            .expect("count")
            .get(0)
    };
    let wait_rows = |url: &str, n: i64| {
        common::poll_blocking("the writer's progress", Duration::from_secs(20), || {
            count(url) >= n
        })
    };
    wait_rows(&url, 50);
    pg::logical::install(&url, &t).expect("to logical");
    let src = PgSource::open_logical(&url, &t, 1 << 30).expect("source");
    wait_rows(&url, count(&url) + 50);
    // Read (and so pump) while the writer goes on.
    let moved = src.read_after(0, 100_000).expect("read");
    assert!(!moved.is_empty());
    wait_rows(&url, count(&url) + 50);
    pg::install(&url, &t).expect("back to triggers");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("writer");
    // Read by the trigger mode's reader, which passes holes on a later read: until every
    // payment row's event is in.
    let reader = PgSource::open(&url, &[]).expect("source");
    let mut events: Vec<tether_schemas::Event> = Vec::new();
    common::poll_blocking("every commit's event", Duration::from_secs(10), || {
        let after = events.last().map_or(0, |e| e.seq);
        events.extend(reader.read_after(after, 1000).expect("read"));
        events.iter().filter(|e| e.entity == "payment").count() as i64 >= written
    });
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for e in events.iter().filter(|e| e.entity == "payment") {
        let p = e
            .row
            .as_ref()
            .and_then(|r| r.get("patient_id"))
            .and_then(Value::as_i64)
            .expect("patient_id");
        *seen.entry(p).or_default() += 1;
    }
    let lost: Vec<i64> = (0..written).filter(|p| !seen.contains_key(p)).collect();
    let doubled: Vec<i64> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(p, _)| *p)
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(doubled.is_empty(), "captured twice: {doubled:?}");
    assert_eq!(seen.len() as i64, written);
    let slots: i64 = Client::connect(&url, NoTls)
        .expect("connect")
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "the slot is gone with logical capture");
}

/// End to end with `capture: logical`, the agent's connections killed three times mid-stream.
#[test]
fn agent_on_postgres_logical_capture_syncs_and_heals() {
    let pg = PrivatePg::start_logical();
    let url = private_db(&pg, "clinic");
    actix::System::new().block_on(e2e(url, true, "logical"));
}

/// A port's connection thread that died (a panic in a call) is replaced on the next call.
#[test]
fn a_postgres_port_whose_thread_died_is_restarted() {
    let db = TestDb::new();
    let conn = pg::PgConn::open(&db.url).expect("open");
    let r: Result<(), _> = conn.with(|_| panic!("a bug in a call"));
    assert!(r.is_err(), "the call that met the dead thread fails");
    let one: i32 = conn
        .with(|c| {
            c.query_one("SELECT 1", &[])
                .map(|r| r.get(0))
                .map_err(|e| tether_actors::ports::PortError::new(e.to_string()))
        })
        .expect("the port works again");
    assert_eq!(one, 1);
}

/// One agent per PostgreSQL clinic database: a second taker of the lock is refused after its
/// wait, naming the holder (host and pid); another database is not affected; once the first
/// holder lets go (its session ends), the lock can be taken again.
#[test]
fn a_second_agent_on_the_same_postgres_database_is_refused_naming_the_first() {
    use tether::db::instance::InstanceError;
    let (db, other) = (TestDb::new(), TestDb::new());
    let first = tether::db::postgres::lock_instance(&db.url, Duration::ZERO).expect("first");
    let t0 = std::time::Instant::now();
    match tether::db::postgres::lock_instance(&db.url, Duration::from_millis(300)) {
        Err(InstanceError::Held { holder }) => {
            assert!(
                holder.contains(&format!("pid {}", std::process::id()))
                    && holder.contains("tether-agent"),
                "{holder}"
            );
            assert!(
                t0.elapsed() >= Duration::from_millis(300),
                "it waited first"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a second agent must be refused"),
    }
    let _elsewhere =
        tether::db::postgres::lock_instance(&other.url, Duration::ZERO).expect("another database");
    drop(first);
    tether::db::postgres::lock_instance(&db.url, Duration::from_secs(5))
        .expect("free once released");
}

/// `agent.rpc.queries` on PostgreSQL: named parameters bound as literals PostgreSQL types from
/// context (a quote in a value stays data, never SQL), rows as typed JSON, `max_rows` with
/// `truncated`, the statement timeout, a read-only transaction (a query that would write is
/// refused at start or at run), and errors naming the parameter.
#[test]
fn rpc_queries_run_read_only_with_their_parameters_bound_as_data() {
    use tether_actors::ports::QueryRunner;
    let db = TestDb::new();
    db.client()
        .batch_execute(
            "INSERT INTO patients (id, name, balance, active, seen_at) VALUES
               (1, 'O''Brien', 12.50, true, '2026-12-02T10:00:00Z'), (2, 'Ada', 0, false, NULL), (3, 'Lin', 3, true, NULL)",
        )
        .expect("rows");
    let rpc: tether::config::RpcConfig = serde_json::from_value(json!({
        "timeout": "300ms",
        "queries": {
            "by_id": {"sql": "SELECT id, name, balance, active, seen_at FROM patients WHERE id = :id", "params": ["id"]},
            "by_name": {"sql": "SELECT id FROM patients WHERE name = :name -- :not_a_param", "params": ["name"]},
            "all": {"sql": "SELECT id FROM patients ORDER BY id", "params": [], "max_rows": 2},
            "slow": {"sql": "SELECT pg_sleep(5)::text AS s", "params": []},
            "sneaky": {"sql": "SELECT nextval('payments_id_seq') AS n", "params": []}
        }
    }))
    .expect("rpc config");
    let q = pg::queries::PgQueries::open(&db.url, &rpc).expect("open");
    let p = |v: Value| v.as_object().cloned().unwrap_or_default();
    let one = q.run("by_id", &p(json!({"id": 1}))).expect("by id");
    assert_eq!(
        Value::Object(one.rows[0].clone()),
        json!({"id": 1, "name": "O'Brien", "balance": 12.50, "active": true, "seen_at": "2026-12-02T10:00:00+00:00"})
    );
    let quoted = q
        .run("by_name", &p(json!({"name": "O'Brien"})))
        .expect("quote");
    assert_eq!(quoted.rows.len(), 1);
    let injected = q
        .run("by_name", &p(json!({"name": "x' OR '1'='1"})))
        .expect("injection is data");
    assert!(injected.rows.is_empty(), "{:?}", injected.rows);
    let all = q.run("all", &Map::new()).expect("all");
    assert_eq!((all.rows.len(), all.truncated), (2, true));
    let e = q.run("by_id", &Map::new()).expect_err("missing");
    assert_eq!(e.field.as_deref(), Some("params.id"));
    let e = q
        .run("by_id", &p(json!({"id": [1]})))
        .expect_err("not a scalar");
    assert_eq!(e.field.as_deref(), Some("params.id"));
    let e = q
        .run("by_id", &p(json!({"id": 1, "x": 2})))
        .expect_err("extra");
    assert_eq!(e.field.as_deref(), Some("params.x"));
    let e = q.run("slow", &Map::new()).expect_err("timeout");
    assert!(e.message.contains("statement timeout"), "{}", e.message);
    let e = q.run("sneaky", &Map::new()).expect_err("writes");
    assert!(e.message.contains("read-only transaction"), "{}", e.message);
    // A query that writes is refused before the agent starts.
    let writes: tether::config::RpcConfig = serde_json::from_value(json!({
        "queries": {"wipe": {"sql": "DELETE FROM patients", "params": []}}
    }))
    .expect("config");
    let err = pg::queries::PgQueries::open(&db.url, &writes)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("agent.rpc.queries.wipe"), "{err}");
}

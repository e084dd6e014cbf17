//! Cloud → clinic calls (`POST /v1/clinics/{id}/rpc`) over real sessions: an allow-listed,
//! parameterised query runs in the clinic database and its rows come back; anything else is
//! refused with an answer naming what is wrong; a read-only connection refuses writes; a
//! clinic that is offline, silent or too slow gets a clear error, never a hang.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tether::fleet::Fleet;

const HB: Duration = Duration::from_millis(500);

const QUERIES: &str = "  rpc:
    timeout: 500ms
    queries:
      patient_balance:
        sql: SELECT patient_id, count(*) AS payments, sum(amount_cents) AS paid_cents FROM payments WHERE patient_id = :patient_id GROUP BY patient_id
        params: [patient_id]
      patients_named:
        sql: SELECT id, name FROM patients WHERE name LIKE :pattern ORDER BY id
        params: [pattern]
        max_rows: 2
      sneaky_delete:
        sql: DELETE FROM patients WHERE id = :id
        params: [id]
      endless:
        sql: WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n
";

async fn rpc(fleet: &Fleet, clinic: &str, body: Value) -> (u16, Value) {
    post_as(
        Some(fleet),
        &format!("{}/v1/clinics/{clinic}/rpc", fleet.http_url()),
        &body,
    )
    .await
}

#[actix_rt::test]
async fn allow_listed_queries_answer_with_rows_and_everything_else_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 2, HB).expect("fleet");
    for c in &mut fleet.clinics {
        let cfg_text = format!(
            "agent:\n  clinic_id: {}\n  database:\n    path: {}\n  gateway:\n    url: ws://unused/v1/ws\n    insecure_plaintext: true\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n{QUERIES}",
            c.id,
            c.db.display()
        );
        let parsed = tether::config::Config::parse(&cfg_text, "rpc test")
            .expect("valid rpc config")
            .agent
            .expect("agent");
        c.config.rpc = parsed.rpc;
    }
    // Known data in clinic 1: patient 7 with two payments.
    {
        let conn = tether::db::sqlite::open(&fleet.clinics[0].db).expect("open");
        conn.execute_batch(
            "INSERT INTO patients (id, name) VALUES (7, 'Ana Silva'), (8, 'Ana Souza'), (9, 'Ana Lima');
             INSERT INTO payments (patient_id, amount_cents, method) VALUES (7, 5000, 'card'), (7, 7500, 'cash');",
        )
        .expect("seed");
    }
    fleet.start_agents().await.expect("agents");
    let (a, b) = (fleet.clinics[0].id.clone(), fleet.clinics[1].id.clone());
    wait_until("both clinics connected", Duration::from_secs(20), || {
        let s: Vec<_> = fleet
            .clinics
            .iter()
            .map(|c| {
                c.agent.as_ref().is_some_and(|a| {
                    a.handle
                        .stats
                        .connected
                        .load(std::sync::atomic::Ordering::Relaxed)
                })
            })
            .collect();
        async move { s.iter().all(|x| *x) }
    })
    .await;

    let (status, v) = rpc(
        &fleet,
        &a,
        json!({"name": "patient_balance", "params": {"patient_id": 7}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["rows"],
        json!([{"patient_id": 7, "payments": 2, "paid_cents": 12500}])
    );
    assert_eq!(v["truncated"], false);
    // The same query at another clinic answers from that clinic's database only.
    let (status, v) = rpc(
        &fleet,
        &b,
        json!({"name": "patient_balance", "params": {"patient_id": 7}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rows"], json!([]));
    // max_rows.
    let (status, v) = rpc(
        &fleet,
        &a,
        json!({"name": "patients_named", "params": {"pattern": "Ana %"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["truncated"], true);

    // Refusals name the field.
    for (body, code, field) in [
        (json!({"name": "drop_everything"}), 422, "name"),
        (json!({"name": "patient_balance"}), 422, "params.patient_id"),
        (
            json!({"name": "patient_balance", "params": {"patient_id": 7, "x": 1}}),
            422,
            "params.x",
        ),
        (
            json!({"name": "patient_balance", "params": {"patient_id": [7]}}),
            422,
            "params.patient_id",
        ),
        (
            json!({"name": "patient_balance", "sql": "SELECT 1"}),
            400,
            "sql",
        ),
        (
            json!({"name": "patient_balance", "params": {"patient_id": 7}, "timeout_ms": 0}),
            400,
            "timeout_ms",
        ),
    ] {
        let (status, v) = rpc(&fleet, &a, body.clone()).await;
        assert_eq!(status, code, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    // A write is refused by the read-only connection, and nothing was deleted.
    let (status, v) = rpc(
        &fleet,
        &a,
        json!({"name": "sneaky_delete", "params": {"id": 7}}),
    )
    .await;
    assert_eq!(status, 502, "{v}");
    assert!(
        v["detail"].as_str().unwrap_or("").contains("readonly"),
        "{v}"
    );
    let conn = tether::db::sqlite::open(&fleet.clinics[0].db).expect("open");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM patients WHERE id = 7", [], |r| {
            r.get(0)
        })
        .expect("count");
    assert_eq!(n, 1);
    // A runaway query is interrupted at agent.rpc.timeout (500 ms) ...
    let (status, v) = rpc(&fleet, &a, json!({"name": "endless", "timeout_ms": 20000})).await;
    assert_eq!(status, 502, "{v}");
    assert!(
        v["detail"].as_str().unwrap_or("").contains("interrupted"),
        "{v}"
    );
    // ... and a caller's shorter deadline answers 504 without waiting for it.
    let started = std::time::Instant::now();
    let (status, v) = rpc(&fleet, &a, json!({"name": "endless", "timeout_ms": 100})).await;
    assert_eq!(status, 504, "{v}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The clinic still answers afterwards.
    let (status, _) = rpc(
        &fleet,
        &a,
        json!({"name": "patient_balance", "params": {"patient_id": 7}}),
    )
    .await;
    assert_eq!(status, 200);

    // An offline clinic, and one never seen: 503 naming the clinic, at once.
    fleet.clinics[1].agent.take().expect("agent").stop();
    wait_until("clinic 2 offline", Duration::from_secs(10), || {
        let url = format!("{}/v1/clinics/{b}", fleet.http_url());
        let f = &fleet;
        async move { get_as(Some(f), &url).await.1["connected"] == false }
    })
    .await;
    for clinic in [b.as_str(), "clinic-999"] {
        let (status, v) = rpc(
            &fleet,
            clinic,
            json!({"name": "patient_balance", "params": {"patient_id": 7}}),
        )
        .await;
        assert_eq!(status, 503, "{v}");
        assert!(v["detail"].as_str().unwrap_or("").contains(clinic), "{v}");
    }
    // The calls are logged (name, id, row count), the parameters and rows never are.
    let message = read_log(dir.path(), "message");
    assert!(message.contains("event=rpc_answered"), "{message}");
    assert!(message.contains("name=patient_balance"), "{message}");
    for f in std::fs::read_dir(dir.path().join("logs"))
        .expect("logs")
        .flatten()
    {
        let text = std::fs::read_to_string(f.path()).unwrap_or_default();
        for secret in ["Ana Silva", "Ana %", "12500"] {
            assert!(!text.contains(secret), "{secret} in {}", f.path().display());
        }
    }
    fleet.stop().await;
}

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
      endless:
        sql: WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n
";

/// Every clinic of the fleet gets the queries of `QUERIES`.
fn with_queries(fleet: &mut Fleet) {
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
}

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
    with_queries(&mut fleet);
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

/// The eight write-capable texts of the attack run, and more.
const WRITING: [&str; 9] = [
    "PRAGMA query_only = 0",
    "DELETE FROM patients",
    "ATTACH DATABASE 'ATTACHED' AS x",
    "SELECT 1; DELETE FROM patients",
    "WITH d AS (SELECT 1) DELETE FROM patients",
    "UPDATE patients SET name = 'x'",
    "INSERT INTO patients (id, name) VALUES (99, 'x')",
    "VACUUM INTO 'COPY'",
    "BEGIN IMMEDIATE",
];

#[test]
fn write_capable_queries_are_refused_by_check_config_and_by_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("clinic.db");
    tether::fleet::create_sample_clinic(&db).expect("clinic");
    for sql in WRITING {
        let sql = sql
            .replace(
                "ATTACHED",
                &dir.path().join("attached.db").display().to_string(),
            )
            .replace("COPY", &dir.path().join("copy.db").display().to_string());
        // check-config: the problem is named by the query's key.
        let text = format!(
            "agent:\n  clinic_id: c1\n  database:\n    path: {}\n  gateway:\n    url: ws://unused/v1/ws\n    insecure_plaintext: true\n  tables:\n    - {{table: patients, entity: patient, key: [id]}}\n  rpc:\n    queries:\n      sneaky:\n        sql: \"{}\"\n",
            db.display(),
            sql.replace('"', "\\\"")
        );
        let err = match tether::config::Config::parse(&text, "test") {
            Ok(_) => panic!("check-config accepted {sql:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("agent.rpc.queries.sneaky.sql") && err.contains("not read-only"),
            "{sql:?}: {err}"
        );
        // The agent asks SQLite itself, whatever the text check said: it does not start.
        let mut rpc = tether::config::RpcConfig::default();
        let mut q = tether::config::RpcQueryConfig::default();
        q.sql = sql.clone();
        rpc.queries.insert("sneaky".into(), q);
        match tether::db::sqlite::SqliteQueries::open(&db, &rpc) {
            Ok(_) => panic!("the agent would run {sql:?}"),
            Err(e) => assert!(e.to_string().contains("agent.rpc.queries.sneaky"), "{e}"),
        }
    }
    assert!(
        !dir.path().join("attached.db").exists(),
        "ATTACH created a file"
    );
    assert!(
        !dir.path().join("copy.db").exists(),
        "VACUUM INTO wrote a file"
    );
    let conn = tether::db::sqlite::open(&db).expect("open");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM patients", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 0, "nothing was written");
}

/// A fleet of one whose gateway has production frame limits (200 frames/s, burst 400).
async fn fleet_with_production_limits(dir: &std::path::Path) -> Fleet {
    use tether::gateway::{self, GatewaySecurity};
    let mut fleet = Fleet::insecure(dir, 1, HB).expect("fleet");
    let old = fleet.gateway.take().expect("gateway");
    let addr = old.addr;
    old.stop().await;
    let mut settings = fleet.gateway_settings.clone();
    settings.listen = addr.to_string();
    let security = GatewaySecurity {
        message_rate: (200.0, 400.0),
        ..GatewaySecurity::insecure()
    };
    fleet.gateway = Some(gateway::start(settings, security).expect("gateway"));
    with_queries(&mut fleet);
    fleet.start_agents().await.expect("agents");
    wait_until("the clinic connected", Duration::from_secs(20), || {
        let up = fleet.clinics[0].agent.as_ref().is_some_and(|a| {
            a.handle
                .stats
                .connected
                .load(std::sync::atomic::Ordering::Relaxed)
        });
        async move { up }
    })
    .await;
    fleet
}

fn links_up(fleet: &Fleet) -> u64 {
    fleet.clinics[0]
        .agent
        .as_ref()
        .map(|a| tether_actors::AgentStats::get(&a.handle.stats.links_up))
        .unwrap_or(0)
}

#[actix_rt::test]
async fn a_burst_of_rpc_calls_gets_429s_and_never_closes_the_clinics_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = fleet_with_production_limits(dir.path()).await;
    let clinic = fleet.clinics[0].id.clone();
    let url = format!("{}/v1/clinics/{clinic}/rpc", fleet.http_url());
    let body = json!({"name": "patient_balance", "params": {"patient_id": 7}});
    let mut counts = std::collections::BTreeMap::new();
    // 500 sequential calls as fast as they are answered...
    for _ in 0..500 {
        let mut resp = client().post(&url).send_json(&body).await.expect("answer");
        let status = resp.status().as_u16();
        if status == 429 {
            assert_eq!(
                resp.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("1")
            );
        }
        let _ = resp.body().await;
        *counts.entry(status).or_insert(0u32) += 1;
    }
    // ... then 20 callers at once.
    let calls = (0..20).map(|_| {
        let (url, body) = (url.clone(), body.clone());
        async move {
            let mut n = Vec::new();
            for _ in 0..25 {
                n.push(post_json(&url, &body).await.0);
            }
            n
        }
    });
    for status in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
    {
        *counts.entry(status).or_insert(0u32) += 1;
    }
    assert!(counts.get(&200).copied().unwrap_or(0) >= 50, "{counts:?}");
    assert!(
        counts.get(&429).copied().unwrap_or(0) > 0,
        "the limit was reached: {counts:?}"
    );
    assert!(
        counts.keys().all(|s| *s == 200 || *s == 429),
        "only answers and 429s: {counts:?}"
    );
    assert_eq!(links_up(&fleet), 1, "the clinic's link was never dropped");
    fleet.stop().await;
}

#[actix_rt::test]
async fn rpc_queries_run_side_by_side_and_busy_is_not_a_database_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = fleet_with_production_limits(dir.path()).await;
    let clinic = fleet.clinics[0].id.clone();
    let url = format!("{}/v1/clinics/{clinic}/rpc", fleet.http_url());
    // Four runaway queries (each interrupted at agent.rpc.timeout, 500 ms) at once: they end
    // together, not one after the other.
    let started = std::time::Instant::now();
    let slow = (0..4).map(|_| {
        let url = url.clone();
        async move {
            let r = post_json(&url, &json!({"name": "endless", "timeout_ms": 20000})).await;
            (r, started.elapsed())
        }
    });
    let done = futures_util::future::join_all(slow).await;
    for ((status, v), _) in &done {
        assert_eq!(*status, 502, "{v}");
    }
    let last = done.iter().map(|(_, t)| *t).max().unwrap_or_default();
    assert!(
        last < Duration::from_millis(1_800),
        "four 500 ms queries took {last:?}: they ran one at a time (that takes 2 s)"
    );
    // A fast query does not wait behind a slow one: it is answered first.
    let slow_url = url.clone();
    let slow = actix_rt::spawn(async move {
        let r = post_json(&slow_url, &json!({"name": "endless", "timeout_ms": 20000})).await;
        (r, std::time::Instant::now())
    });
    // Pacing: the slow query is sent and running first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, v) = post_json(
        &url,
        &json!({"name": "patient_balance", "params": {"patient_id": 7}}),
    )
    .await;
    let fast_done = std::time::Instant::now();
    assert_eq!(status, 200, "{v}");
    let ((slow_status, _), slow_done) = slow.await.expect("slow call");
    assert_eq!(slow_status, 502);
    assert!(
        fast_done < slow_done,
        "the fast query waited for the slow one"
    );
    // A fifth call while four run: 429 from the gateway (Retry-After), before the clinic.
    let calls = (0..5).map(|_| {
        let url = url.clone();
        async move { post_json(&url, &json!({"name": "endless", "timeout_ms": 20000})).await }
    });
    let statuses: Vec<u16> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(links_up(&fleet), 1);
    fleet.stop().await;
}

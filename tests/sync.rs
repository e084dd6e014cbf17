//! End-to-end sync in one process: a gateway on 127.0.0.1:0 and three agents on SQLite files.
//! Every test ends with the history check (row by row, clinic database vs gateway store).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tether::fleet::{cloud_id, Fleet};

const HB: Duration = Duration::from_millis(500);

#[actix_rt::test]
async fn inserts_updates_deletes_and_multi_row_statements_arrive_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), 3, HB).expect("fleet");
    // Some history exists before the agents start: it must be picked up too.
    for c in &fleet.clinics {
        write_activity(&c.db, 50);
    }
    fleet.start_agents().await.expect("agents");
    for c in &fleet.clinics {
        write_activity(&c.db, 200);
        let conn = tether::db::sqlite::open(&c.db).expect("open");
        // Multi-row statements: one UPDATE and one DELETE touching many rows.
        conn.execute(
            "UPDATE appointments SET status = 'confirmed' WHERE status = 'booked'",
            [],
        )
        .expect("multi-row update");
        conn.execute("DELETE FROM appointments WHERE id % 3 = 0", [])
            .expect("multi-row delete");
    }
    wait_drained(&fleet, Duration::from_secs(30)).await;
    let reports = assert_history_clean(&fleet, &[]);
    for r in &reports {
        assert!(r.written > 250, "{r:?}");
    }
    // Each op kind really went through.
    let store = fleet.store().expect("store");
    let mut ops: Vec<String> = common::all_events(store.as_ref())
        .into_iter()
        .map(|e| e.op)
        .collect();
    ops.sort();
    ops.dedup();
    assert_eq!(ops, vec!["delete", "insert", "update"]);
    fleet.stop().await;
}

#[actix_rt::test]
async fn cloud_updates_land_exactly_once_are_not_echoed_and_a_poison_update_blocks_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), 3, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    let base = fleet.http_url();
    let mut sent = Vec::new();
    for n in 0..30u64 {
        let ci = (n % 3) as usize;
        let clinic = fleet.clinics[ci].id.clone();
        let id = cloud_id(n);
        let body = if n == 7 {
            // Poison: passes the entity schema (which refuses unknown columns at the REST API),
            // fails at the clinic (`updated_at` is NOT NULL there).
            json!({"entity": "patient", "op": "upsert", "key": {"id": id}, "row": {"id": id, "name": "x", "updated_at": null}})
        } else {
            json!({"entity": "patient", "op": "upsert", "key": {"id": id}, "row": {"id": id, "name": format!("Cloud {n}")}})
        };
        let (status, v) = post_as(
            Some(&fleet),
            &format!("{base}/v1/clinics/{clinic}/updates"),
            &body,
        )
        .await;
        assert_eq!(status, 202, "{v}");
        sent.push((
            ci,
            n,
            v["update_id"].as_str().expect("update_id").to_string(),
        ));
    }
    let store = fleet.store().expect("store");
    wait_until(
        "every update to be answered",
        Duration::from_secs(30),
        || {
            let done = sent.iter().all(|(_, _, id)| {
                matches!(
                    tether::gateway::store::wait(store.update(id))
                        .ok()
                        .flatten()
                        .map(|u| u.status)
                        .as_deref(),
                    Some("applied" | "failed")
                )
            });
            async move { done }
        },
    )
    .await;
    for (ci, n, id) in &sent {
        let (status, u) = get_as(Some(&fleet), &format!("{base}/v1/updates/{id}")).await;
        assert_eq!(status, 200);
        let (rows, inbox) = applied_counts(&fleet.clinics[*ci].db, cloud_id(*n), id);
        assert_eq!(inbox, 1, "update {id} recorded once in the inbox");
        if *n == 7 {
            assert_eq!(u["status"], "failed");
            assert!(
                u["reason"].as_str().unwrap_or("").contains("updated_at"),
                "{u}"
            );
            assert_eq!(rows, 0);
        } else {
            assert_eq!(u["status"], "applied", "{u}");
            assert_eq!(rows, 1);
        }
    }
    // A clinic write after the updates still flows (and is the only thing in the outbox).
    for c in &fleet.clinics {
        write_activity(&c.db, 10);
    }
    wait_drained(&fleet, Duration::from_secs(30)).await;
    let echo: Vec<_> = sent
        .iter()
        .map(|(ci, n, _)| (*ci, "patient".to_string(), json!({"id": cloud_id(*n)})))
        .collect();
    assert_history_clean(&fleet, &echo);
    fleet.stop().await;
}

#[actix_rt::test]
async fn connection_dropped_mid_batch_repeatedly_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), 3, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    let dbs: Vec<_> = fleet.clinics.iter().map(|c| c.db.clone()).collect();
    let writer = std::thread::spawn(move || {
        for db in &dbs {
            write_activity(db, 600);
        }
    });
    // Drop every established link again and again while batches are in flight, until each
    // clinic has reconnected at least three times.
    let links = |c: &tether::fleet::Clinic| {
        c.agent
            .as_ref()
            .map(|a| tether_actors::AgentStats::get(&a.handle.stats.links_up))
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !writer.is_finished() || fleet.clinics.iter().any(|c| links(c) < 4) {
        assert!(
            std::time::Instant::now() < deadline,
            "links did not come back"
        );
        for c in &fleet.clinics {
            let Some(a) = c.agent.as_ref() else { continue };
            if a.handle
                .stats
                .connected
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                if let Some(conn) = a.handle.slots.connection.get() {
                    conn.do_send(tether_actors::connection::DropLink);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    writer.join().expect("writer");
    wait_drained(&fleet, Duration::from_secs(60)).await;
    assert_history_clean(&fleet, &[]);
    fleet.stop().await;
}

#[cfg(feature = "fault-injection")]
#[actix_rt::test]
async fn panic_in_each_actor_is_logged_restarted_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    let clinic = &fleet.clinics[0];
    let agent = clinic.agent.as_ref().expect("agent");
    for (i, actor) in tether_actors::agent::ACTOR_NAMES.iter().enumerate() {
        write_activity(&clinic.db, 40);
        // The applier crashes while it has work: an update is posted just before.
        let body = json!({"entity": "patient", "op": "upsert", "key": {"id": cloud_id(i as u64)}, "row": {"id": cloud_id(i as u64), "name": "After crash"}});
        let (status, _) = post_as(
            Some(&fleet),
            &format!("{}/v1/clinics/{}/updates", fleet.http_url(), clinic.id),
            &body,
        )
        .await;
        assert_eq!(status, 202);
        assert!(agent.handle.inject_panic(actor), "{actor} was running");
        let restarted = format!("actor={actor} event=restarted");
        wait_until(
            &format!("{actor} restarted"),
            Duration::from_secs(10),
            || {
                let seen = read_log(dir.path(), "supervisor").contains(&restarted);
                async move { seen }
            },
        )
        .await;
        write_activity(&clinic.db, 40);
    }
    wait_drained(&fleet, Duration::from_secs(30)).await;
    wait_until(
        "updates applied after the crashes",
        Duration::from_secs(20),
        || {
            let n = common::gateway_db_count(
                &dir.path().join("gateway.db"),
                "SELECT count(*) FROM updates WHERE status = 'applied'",
            );
            async move { n == 4 }
        },
    )
    .await;
    let echo: Vec<_> = (0..4u64)
        .map(|i| (0usize, "patient".to_string(), json!({"id": cloud_id(i)})))
        .collect();
    assert_history_clean(&fleet, &echo);
    let restarts = agent.handle.stats.restarts();
    let log = read_log(dir.path(), "supervisor");
    for actor in tether_actors::agent::ACTOR_NAMES {
        assert_eq!(restarts.get(actor), Some(&1), "{restarts:?}");
        let line = log
            .lines()
            .find(|l| l.contains(&format!("actor={actor} event=crashed")))
            .unwrap_or_else(|| panic!("supervisor log lacks the {actor} crash:\n{log}"));
        assert!(
            line.contains("reason=panicked") && line.contains("restart=1"),
            "{line}"
        );
        assert!(
            log.contains(&format!("actor={actor} event=restarted")),
            "{log}"
        );
    }
    // The gateway (and its dashboard) learn the count from the agent's next batch.
    write_activity(&fleet.clinics[0].db, 5);
    let url = format!("{}/v1/clinics/{}", fleet.http_url(), fleet.clinics[0].id);
    wait_until(
        "the gateway to see 4 restarts",
        Duration::from_secs(20),
        || {
            let (f, u) = (&fleet, url.clone());
            async move { get_as(Some(f), &u).await.1["agent_restarts"] == 4 }
        },
    )
    .await;
    fleet.stop().await;
}

/// A clinic whose database is re-created (a reinstall) starts its outbox sequences again. The
/// gateway refuses the new database (4009, `duplicate_source` in the agent's status) and stores
/// nothing of it until an operator confirms the re-install; then the new changes are not taken
/// for duplicates of the old ones.
#[actix_rt::test]
async fn a_recreated_clinic_database_is_not_mistaken_for_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    write_activity(&fleet.clinics[0].db, 60);
    wait_drained(&fleet, Duration::from_secs(20)).await;
    if let Some(a) = fleet.clinics[0].agent.take() {
        a.stop();
    }
    let db = fleet.clinics[0].db.clone();
    let gdb = dir.path().join("gateway.db");
    let old_source = common::gateway_db_count(
        &gdb,
        "SELECT source_id FROM clinics WHERE clinic_id = 'clinic-001'",
    );
    // Windows deletes no file that is still open: wait (with a deadline) until the old agent
    // has let go of the database, and make sure it is really gone.
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        wait_until(
            &format!("the old agent to let go of {path}"),
            Duration::from_secs(20),
            || {
                let removed = match std::fs::remove_file(&path) {
                    Ok(()) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                };
                async move { removed }
            },
        )
        .await;
    }
    assert!(!db.exists(), "the old database is gone");
    tether::fleet::create_sample_clinic(&db).expect("re-created clinic");
    write_activity(&db, 25);
    let new_head = Fleet::outbox_head(&db).expect("head");
    let new_source: i64 = tether::db::sqlite::open(&db)
        .expect("open")
        .query_row(
            "SELECT value FROM _tether_state WHERE name = 'source_id'",
            [],
            |r| r.get(0),
        )
        .expect("source id");
    assert_ne!(
        new_source, old_source,
        "a re-created database has a new source id"
    );
    fleet.start_agents().await.expect("agent again");
    let store = fleet.store().expect("store");
    let old_acked = tether::gateway::store::wait(store.acked_seq("clinic-001")).expect("acked");
    wait_until(
        "the new database to be refused as a duplicate source",
        Duration::from_secs(20),
        || {
            let r = fleet.clinics[0]
                .agent
                .as_ref()
                .and_then(|a| a.handle.stats.refusal());
            async move { r.is_some_and(|r| r.status == 4009 && r.reason == "duplicate_source") }
        },
    )
    .await;
    assert_eq!(
        common::gateway_db_count(
            &gdb,
            "SELECT source_id FROM clinics WHERE clinic_id = 'clinic-001'"
        ),
        old_source,
        "the refused database changed nothing"
    );
    assert_eq!(
        tether::gateway::store::wait(store.acked_seq("clinic-001")).expect("acked"),
        old_acked
    );
    // The fleet views say so.
    let (_, clinic) = common::get_as(
        Some(&fleet),
        &format!("{}/v1/clinics/clinic-001", fleet.http_url()),
    )
    .await;
    assert_eq!(clinic["refused"], "duplicate_source", "{clinic}");
    let mut metrics = fleet
        .authorize(
            fleet
                .rest_client()
                .expect("client")
                .get(format!("{}/metrics", fleet.http_url())),
        )
        .send()
        .await
        .expect("metrics");
    let text = String::from_utf8(metrics.body().await.expect("body").to_vec()).expect("utf8");
    assert!(
        text.lines().any(
            |l| l.starts_with("tether_gateway_duplicate_source_refusals_total ")
                && !l.ends_with(" 0")
        ),
        "{text}"
    );
    let (status, body) = common::post_as(
        Some(&fleet),
        &format!("{}/v1/clinics/clinic-001/source-reset", fleet.http_url()),
        &serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let read = || {
        let q = |sql: &str| common::gateway_db_count(&gdb, sql);
        (
            q("SELECT source_id FROM clinics WHERE clinic_id = 'clinic-001'"),
            q("SELECT acked_seq FROM clinics WHERE clinic_id = 'clinic-001'"),
            q("SELECT count(*) FROM events e JOIN clinics k ON k.clinic_id = e.clinic_id AND k.source_id = e.source_id WHERE k.clinic_id = 'clinic-001'"),
        )
    };
    wait_until(
        "the new database's changes to be acknowledged",
        Duration::from_secs(20),
        || {
            let (source, acked, _) = read();
            async move { source == new_source && acked as u64 >= new_head }
        },
    )
    .await;
    let (source, _, stored) = read();
    assert_ne!(source, 0);
    assert_eq!(
        stored as u64, new_head,
        "every change of the new database arrived"
    );
    fleet.stop().await;
}

/// A queued backlog drains as fast as the link acknowledges it, not one read chunk per poll
/// interval: with a 2 s poll interval and 100-event chunks, 3,000 queued changes would need 60 s
/// read one chunk per poll; they must all arrive within a few poll intervals.
#[actix_rt::test]
async fn a_queued_backlog_is_read_on_without_waiting_a_poll_interval_per_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleet = Fleet::insecure(dir.path(), 1, HB).expect("fleet");
    let c = &mut fleet.clinics[0];
    c.config.outbox.poll_interval = tether::config::Dur::millis(2_000);
    c.config.outbox.batch_max_events = 100;
    let conn = tether::db::sqlite::open(&c.db).expect("open");
    conn.execute(
        "INSERT INTO payments (patient_id, amount_cents, method) \
         WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 3000) \
         SELECT i, i * 7, 'card' FROM s",
        [],
    )
    .expect("backlog");
    drop(conn);
    fleet.start_agents().await.expect("agents");
    // 12 s: a few poll intervals, far below the 60 s of one chunk per interval.
    wait_drained(&fleet, Duration::from_secs(12)).await;
    assert_history_clean(&fleet, &[]);
    fleet.stop().await;
}

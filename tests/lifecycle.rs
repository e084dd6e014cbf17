//! Fleet lifecycle through real agents, TLS and tokens: a clinic enrolled while the gateway
//! runs, refusals the agent can act on, and a wrong gateway URL named as one.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tether::fleet::{start_agent, Fleet};
use tether_actors::stats::Refusal;

const HB: Duration = Duration::from_millis(500);

fn refusal(fleet: &Fleet, i: usize) -> Option<Refusal> {
    fleet.clinics[i]
        .agent
        .as_ref()
        .and_then(|a| a.handle.stats.refusal())
}

/// A clinic whose registry entry is withdrawn while it runs is closed and then refused, and
/// its agent says why (`unknown_key_id`, in its stats, status and log); once the entry is back
/// it connects without a gateway restart, its changes arrive, and the refusal is cleared.
#[actix_rt::test]
async fn a_clinic_enrolled_while_the_gateway_runs_connects_and_its_agent_says_why_it_was_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 2, HB).expect("fleet");
    let certs = fleet.certs.clone().expect("secure fleet");
    let entry = certs.join("clinics/clinic-002.yaml");
    let parked = dir.path().join("clinic-002.entry");
    std::fs::rename(&entry, &parked).expect("withdraw clinic-002");
    fleet.start_agents().await.expect("agents");
    wait_until(
        "clinic-002's agent to report its refusal",
        Duration::from_secs(20),
        || {
            let r = refusal(&fleet, 1);
            async move { r.is_some_and(|r| r.status == 401 && r.reason == "unknown_key_id") }
        },
    )
    .await;
    let r = refusal(&fleet, 1).expect("refusal");
    let offset = r.clock_offset_ms.expect("the gateway said its time");
    assert!(
        offset.abs() < 2_000,
        "same machine, same clock: offset {offset} ms"
    );
    assert!(refusal(&fleet, 0).is_none(), "clinic-001 is not refused");
    let log = read_log(dir.path(), "connection");
    assert!(
        log.contains("clinic=clinic-002 event=connect_refused status=401 reason=unknown_key_id"),
        "{log}"
    );
    // Changes committed while refused; then the entry is back.
    write_activity(&fleet.clinics[1].db, 20);
    let t0 = Instant::now();
    std::fs::copy(&parked, &entry).expect("enrol clinic-002");
    wait_drained(&fleet, Duration::from_secs(20)).await;
    eprintln!(
        "clinic-002's changes at the gateway {:.2} s after its entry was written",
        t0.elapsed().as_secs_f64()
    );
    assert!(refusal(&fleet, 1).is_none(), "cleared once the link is up");
    assert_history_clean(&fleet, &[]);
    fleet.stop().await;
}

/// A gateway URL with a wrong path answers 404: the agent names it a configuration error and
/// never falls back to HTTP (which would hide the wrong URL), however many attempts it makes.
#[actix_rt::test]
async fn a_wrong_gateway_path_is_a_configuration_error_not_a_blocked_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    let mut cfg = fleet.clinics[0].config.clone();
    cfg.gateway.url = cfg.gateway.url.replace("/v1/ws", "/v1/sync");
    let agent = start_agent(&cfg).await.expect("agent");
    let stats = agent.handle.stats.clone();
    let attempts = cfg.gateway.fallback_after + 3;
    wait_until("several refused attempts", Duration::from_secs(30), || {
        let n = stats.reconnects.load(std::sync::atomic::Ordering::Relaxed);
        async move { n >= attempts }
    })
    .await;
    let r = stats.refusal().expect("a refusal");
    assert_eq!((r.status, r.reason.as_str()), (404, "not_found"));
    assert!(r.advice().contains("agent.gateway.url"), "{}", r.advice());
    assert_eq!(
        stats.fallbacks.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a 404 must not switch to the HTTP fallback"
    );
    assert!(!stats.on_http.load(std::sync::atomic::Ordering::Relaxed));
    let log = read_log(dir.path(), "connection");
    assert!(
        log.contains("event=config_error status=404 reason=not_found"),
        "{log}"
    );
    assert!(!log.contains("event=upgrade_blocked"), "{log}");
    agent.stop();
    fleet.stop().await;
}

/// A REST call on the fleet's gateway with the admin token: status and JSON body (Null if none).
async fn call(
    fleet: &Fleet,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let client = fleet.rest_client().expect("client");
    let mut req = fleet.authorize(client.request(
        method.parse().expect("method"),
        format!("{}{path}", fleet.http_url()),
    ));
    for h in headers {
        req = req.insert_header(*h);
    }
    let mut resp = match body {
        Some(b) => req.send_json(&b).await,
        None => req.send().await,
    }
    .expect("response");
    let bytes = resp.body().await.expect("body");
    (
        resp.status().as_u16(),
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

fn patients_named(db: &std::path::Path, name: &str) -> i64 {
    tether::db::sqlite::open(db)
        .expect("open")
        .query_row(
            "SELECT count(*) FROM patients WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .expect("count")
}

/// Cloud updates an application can rely on, through a real gateway and agent: a retried POST
/// with the same `Idempotency-Key` gets the first update back (another body under the key is
/// 409); an update cancelled while its clinic is offline is never applied there, while the
/// other one is; a delivered update cannot be cancelled (409); updates are listed by status.
#[actix_rt::test]
async fn updates_are_idempotent_cancellable_until_delivered_and_listed_by_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    let clinic = fleet.clinics[0].id.clone();
    // The clinic has connected once, then goes offline.
    fleet.start_agents().await.expect("agents");
    wait_drained(&fleet, Duration::from_secs(20)).await;
    fleet.clinics[0].agent.take().expect("agent").stop();
    let path = format!("/v1/clinics/{clinic}/updates");
    let body = |id: u64, name: &str| {
        serde_json::json!({"entity": "patient", "op": "upsert", "key": {"id": id},
                           "row": {"id": id, "name": name, "national_id": format!("N{id}")}})
    };
    let key = [("Idempotency-Key", "price-list-2026-12-02")];
    let (code, first) = call(&fleet, "POST", &path, &key, Some(body(9001, "kept"))).await;
    assert_eq!(code, 202, "{first}");
    let (code, retry) = call(&fleet, "POST", &path, &key, Some(body(9001, "kept"))).await;
    assert_eq!((code, &retry["update_id"]), (202, &first["update_id"]));
    let (code, clash) = call(&fleet, "POST", &path, &key, Some(body(9001, "other"))).await;
    assert_eq!(
        (code, clash["field"].as_str()),
        (409, Some("Idempotency-Key")),
        "{clash}"
    );
    let (_, doomed) = call(&fleet, "POST", &path, &[], Some(body(9002, "cancelled"))).await;
    let doomed = doomed["update_id"].as_str().expect("id").to_string();
    let (code, _) = call(
        &fleet,
        "DELETE",
        &format!("/v1/updates/{doomed}"),
        &[],
        None,
    )
    .await;
    assert_eq!(code, 204);
    let (code, page) = call(&fleet, "GET", &format!("{path}?status=pending"), &[], None).await;
    assert_eq!(code, 200);
    let pending: Vec<&str> = page["updates"]
        .as_array()
        .expect("updates")
        .iter()
        .filter_map(|u| u["update_id"].as_str())
        .collect();
    assert_eq!(pending, vec![first["update_id"].as_str().expect("id")]);
    let (code, unknown) = call(
        &fleet,
        "POST",
        &path,
        &[],
        Some(serde_json::json!({"entity": "invoice", "op": "delete", "key": {"id": 1}})),
    )
    .await;
    assert_eq!(
        (code, unknown["field"].as_str()),
        (422, Some("entity")),
        "an entity no schema describes is refused at once: {unknown}"
    );
    let (code, bad) = call(&fleet, "GET", &format!("{path}?status=lost"), &[], None).await;
    assert_eq!((code, bad["field"].as_str()), (400, Some("status")));
    // Back online: the kept update is applied, the cancelled one never.
    fleet.start_agents().await.expect("agent again");
    let kept = first["update_id"].as_str().expect("id").to_string();
    wait_until("the kept update applied", Duration::from_secs(20), || {
        let f = &fleet;
        let kept = kept.clone();
        async move {
            call(f, "GET", &format!("/v1/updates/{kept}"), &[], None)
                .await
                .1["status"]
                == "applied"
        }
    })
    .await;
    let db = fleet.clinics[0].db.clone();
    assert_eq!(patients_named(&db, "kept"), 1);
    assert_eq!(
        patients_named(&db, "cancelled"),
        0,
        "a cancelled update reached the clinic"
    );
    let (code, late) = call(&fleet, "DELETE", &format!("/v1/updates/{kept}"), &[], None).await;
    assert_eq!(code, 409, "{late}");
    let (_, cancelled) = call(
        &fleet,
        "GET",
        &format!("{path}?status=cancelled"),
        &[],
        None,
    )
    .await;
    assert_eq!(cancelled["updates"][0]["update_id"], doomed.as_str());
    fleet.stop().await;
}

/// A fan-out to the clinics chosen by registry labels, to all of them, and to a list: one
/// update per clinic, followed per batch until every clinic applied it; a retried POST with the
/// same `Idempotency-Key` answers the same batch and queues nothing more; bad choices are
/// refused naming the field.
#[actix_rt::test]
async fn a_fan_out_reaches_exactly_the_chosen_clinics_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 3, HB).expect("fleet");
    fleet.start_agents().await.expect("agents");
    wait_drained(&fleet, Duration::from_secs(20)).await;
    // Label two clinics in their registry files; the gateway picks it up without a restart.
    let certs = fleet.certs.clone().expect("certs");
    for c in ["clinic-001", "clinic-003"] {
        let f = certs.join(format!("clinics/{c}.yaml"));
        let text = std::fs::read_to_string(&f).expect("entry");
        std::fs::write(&f, format!("{text}labels:\n  region: north\n")).expect("label");
    }
    wait_until("the labels in force", Duration::from_secs(10), || {
        let f = &fleet;
        async move {
            let (_, v) = call(f, "GET", "/v1/registry/clinics", &[], None).await;
            v["clinics"].as_array().is_some_and(|a| {
                a.iter()
                    .filter(|c| c["labels"]["region"] == "north")
                    .count()
                    == 2
            })
        }
    })
    .await;
    let upd = |name: &str| {
        let id = 7000 + name.len() as u64;
        serde_json::json!({"entity": "patient", "op": "upsert", "key": {"id": id},
                           "row": {"id": id, "name": name, "national_id": format!("N{id}")}})
    };
    let with = |mut b: serde_json::Value, k: &str, v: serde_json::Value| {
        b[k] = v;
        b
    };
    let key = [("Idempotency-Key", "north-prices-1")];
    let north = with(
        upd("north-price"),
        "labels",
        serde_json::json!({"region": "north"}),
    );
    let (code, a) = call(&fleet, "POST", "/v1/updates", &key, Some(north.clone())).await;
    assert_eq!((code, &a["clinics"]), (202, &serde_json::json!(2)), "{a}");
    let (code, again) = call(&fleet, "POST", "/v1/updates", &key, Some(north)).await;
    assert_eq!(code, 202);
    assert_eq!(
        (&again["batch_id"], &again["update_ids"]),
        (&a["batch_id"], &a["update_ids"])
    );
    let (code, all) = call(
        &fleet,
        "POST",
        "/v1/updates",
        &[],
        Some(with(upd("everyone"), "all", serde_json::json!(true))),
    )
    .await;
    assert_eq!(
        (code, &all["clinics"]),
        (202, &serde_json::json!(3)),
        "{all}"
    );
    let (code, bad) = call(
        &fleet,
        "POST",
        "/v1/updates",
        &[],
        Some(with(
            upd("x"),
            "clinics",
            serde_json::json!(["clinic-001", "clinic-999"]),
        )),
    )
    .await;
    assert_eq!(
        (code, bad["field"].as_str()),
        (422, Some("clinics[1]")),
        "{bad}"
    );
    let both = with(
        with(upd("x"), "clinics", serde_json::json!(["clinic-001"])),
        "all",
        serde_json::json!(true),
    );
    let (code, _) = call(&fleet, "POST", "/v1/updates", &[], Some(both)).await;
    assert_eq!(code, 400);
    for (batch, n) in [(&a["batch_id"], 2u64), (&all["batch_id"], 3)] {
        let path = format!("/v1/update-batches/{}", batch.as_str().expect("batch id"));
        wait_until(
            "every clinic of the batch applied it",
            Duration::from_secs(20),
            || {
                let (f, p) = (&fleet, path.clone());
                async move {
                    let (_, v) = call(f, "GET", &p, &[], None).await;
                    v["by_status"]["applied"] == n && v["total"] == n
                }
            },
        )
        .await;
    }
    let named = |i: usize, name: &str| patients_named(&fleet.clinics[i].db, name);
    assert_eq!(
        (
            named(0, "north-price"),
            named(1, "north-price"),
            named(2, "north-price")
        ),
        (1, 0, 1),
        "exactly the labelled clinics"
    );
    assert_eq!(
        (
            named(0, "everyone"),
            named(1, "everyone"),
            named(2, "everyone")
        ),
        (1, 1, 1)
    );
    let (code, _) = call(&fleet, "GET", "/v1/update-batches/bat_nope", &[], None).await;
    assert_eq!(code, 404);
    fleet.stop().await;
}

/// Two agents on one clinic database: the second refuses to start, naming the first (host and
/// pid), and nothing of it runs; once the first has stopped, an agent starts on it again.
#[actix_rt::test]
async fn a_second_agent_on_the_same_database_refuses_to_start_naming_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    fleet.start_agents().await.expect("the first agent");
    let cfg = fleet.clinics[0].config.clone();
    let second = start_agent(&cfg).await;
    let err = match second {
        Ok(_) => panic!("a second agent on the same database must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("another agent already syncs this database")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    fleet.clinics[0].agent.take().expect("first").stop();
    let again = start_agent(&cfg).await.expect("the database is free again");
    write_activity(&fleet.clinics[0].db, 10);
    fleet.clinics[0].agent = Some(again);
    wait_drained(&fleet, Duration::from_secs(20)).await;
    fleet.stop().await;
}

/// The HTTP fallback says why it is refused too: an agent on `transport: http` whose key is
/// revoked in the registry reports `key_revoked` (read from the 401 of `open`).
#[actix_rt::test]
async fn a_refusal_on_the_http_fallback_names_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let mut fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    let certs = fleet.certs.clone().expect("certs");
    let entry = certs.join("clinics/clinic-001.yaml");
    let text = std::fs::read_to_string(&entry).expect("entry");
    std::fs::write(&entry, format!("revoked: true\n{text}")).expect("revoke");
    fleet.clinics[0].config.gateway.transport = "http".into();
    fleet.start_agents().await.expect("agent");
    wait_until(
        "the agent to report its refusal over HTTP",
        Duration::from_secs(20),
        || {
            let r = refusal(&fleet, 0);
            async move { r.is_some_and(|r| r.reason == "key_revoked") }
        },
    )
    .await;
    let r = refusal(&fleet, 0).expect("refusal");
    assert_eq!(r.status, 401);
    assert!(r.clock_offset_ms.is_some_and(|o| o.abs() < 2_000), "{r:?}");
    assert!(r.advice().contains("revoked"), "{}", r.advice());
    // The clinic's tile says it too (the key is registered to it): refused, and why.
    let url = format!("{}/v1/clinics/{}", fleet.http_url(), fleet.clinics[0].id);
    wait_until(
        "the clinic shown refused",
        Duration::from_secs(10),
        || async { get_as(Some(&fleet), &url).await.1["refused"] == "key_revoked" },
    )
    .await;
    fleet.stop().await;
}

//! Zero-touch enrolment and key renewal through real handshakes: an operator's one-time code,
//! `tether agent enrol` on a clinic PC (its key made there), the written config running an
//! agent whose changes arrive; a code that works once; renewal on the agent's schedule with
//! the old key retired and refused.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tether::enrol::{self, EnrolRequest};
use tether::fleet::{create_sample_clinic, start_agent, Fleet};

const HB: Duration = Duration::from_millis(500);

fn events_of(fleet: &Fleet, clinic: &str) -> usize {
    let store = fleet.store().expect("store");
    all_events(store.as_ref())
        .iter()
        .filter(|e| e.clinic_id == clinic)
        .count()
}

async fn registry_kids(fleet: &Fleet, clinic: &str) -> Vec<String> {
    let (status, v) = get_as(
        Some(fleet),
        &format!("{}/v1/registry/clinics", fleet.http_url()),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["clinics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["clinic_id"] == clinic)
        .flat_map(|c| c["keys"].as_array().cloned().unwrap_or_default())
        .filter_map(|k| k["kid"].as_str().map(str::to_string))
        .collect()
}

/// Opens a WebSocket as `clinic` with a token signed by `key` and the certificate `cert`:
/// the HTTP status of the upgrade (101 when admitted).
async fn handshake_status(
    fleet: &Fleet,
    clinic: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> u16 {
    let certs = fleet.certs.clone().expect("certs");
    let connector = tether::security::tls::connector(&tether::security::tls::ClientTls {
        ca: Some(certs.join("ca.pem")),
        cert: Some(cert.to_path_buf()),
        key: Some(key.to_path_buf()),
        ..Default::default()
    })
    .expect("connector");
    let client = awc::Client::builder()
        .connector(awc::Connector::new().openssl(connector))
        .timeout(Duration::from_secs(10))
        .finish();
    let signer = tether::security::jwt::TokenSigner::from_pem_file(
        key,
        clinic,
        tether::fleet::GATEWAY_ID,
        "",
        Duration::from_secs(60),
    )
    .expect("signer");
    let url = fleet.gateway.as_ref().expect("gateway").ws_url();
    match client
        .ws(url)
        .header(
            "Authorization",
            format!("Bearer {}", signer.sign().expect("token")),
        )
        .connect()
        .await
    {
        Ok((resp, _)) => resp.status().as_u16(),
        Err(awc::error::WsClientError::InvalidResponseStatus(s)) => s.as_u16(),
        Err(e) => panic!("handshake: {e}"),
    }
}

/// The operator issues a code for `clinic-new`; the clinic PC enrols with it and gets a config
/// that runs: its changes arrive at the gateway, under `clinic-new`, through mutual TLS and a
/// token signed by the key made on the PC. The code does not work twice; a request whose
/// certificate request is not signed by its key, or a code that is not a code, is refused
/// naming the field. Then the agent's renewal (on its schedule) replaces the key: the
/// agent reconnects with the new one, the old one is retired and refused at the handshake,
/// and changes keep arriving.
#[actix_rt::test]
async fn a_clinic_enrols_with_a_one_time_code_runs_and_renews_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    let certs = fleet.certs.clone().expect("certs");
    let base = fleet.http_url();

    // The operator: a code for a clinic the registry does not know yet, with a label.
    let (status, issued) = post_as(
        Some(&fleet),
        &format!("{base}/v1/registry/clinics/clinic-new/enrolment-codes"),
        &json!({"ttl": "10m", "labels": {"region": "north"}}),
    )
    .await;
    assert_eq!(status, 201, "{issued}");
    let code = issued["code"].as_str().expect("code").to_string();
    assert_eq!(issued["clinic_id"], "clinic-new");
    // A ttl longer than the gateway allows is refused, naming it.
    let (status, v) = post_as(
        Some(&fleet),
        &format!("{base}/v1/registry/clinics/clinic-new/enrolment-codes"),
        &json!({"ttl": "30d"}),
    )
    .await;
    assert_eq!((status, v["field"].as_str()), (400, Some("ttl")), "{v}");
    // The code is not in any log (only that it was issued, for whom, by whom).
    let audit = read_log(dir.path(), "audit");
    assert!(
        audit.contains("event=enrolment_code_issued clinic=clinic-new by=fleet-admin"),
        "{audit}"
    );
    assert!(!audit.contains(&code), "the code reached a log line");
    // A second code, listed (never the code itself) and withdrawn.
    let (status, second) = post_as(
        Some(&fleet),
        &format!("{base}/v1/registry/clinics/clinic-new/enrolment-codes"),
        &json!({}),
    )
    .await;
    assert_eq!(status, 201, "{second}");
    let second = second["code"].as_str().expect("code").to_string();
    let (status, listed) = get_as(
        Some(&fleet),
        &format!("{base}/v1/registry/clinics/clinic-new/enrolment-codes"),
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["codes"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    assert!(!listed.to_string().contains(&code) && !listed.to_string().contains(&second));
    let client = fleet.rest_client().expect("client");
    let mut resp = fleet
        .authorize(client.delete(format!(
            "{base}/v1/registry/clinics/clinic-new/enrolment-codes"
        )))
        .send()
        .await
        .expect("withdraw");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["withdrawn"], 2);
    let (status, issued) = post_as(
        Some(&fleet),
        &format!("{base}/v1/registry/clinics/clinic-new/enrolment-codes"),
        &json!({"labels": {"region": "north"}}),
    )
    .await;
    assert_eq!(status, 201, "{issued}");
    let code = issued["code"].as_str().expect("code").to_string();

    // The clinic PC: its database exists (the installer made it), nothing else.
    let pc = dir.path().join("pc");
    std::fs::create_dir_all(&pc).expect("pc dir");
    create_sample_clinic(&pc.join("clinic.db")).expect("clinic db");
    let config = pc.join("config.yaml");
    let t0 = Instant::now();
    let request = EnrolRequest {
        gateway: fleet.gateway.as_ref().expect("gateway").ws_url(),
        // As someone might type it from a phone call.
        code: code.to_ascii_lowercase().replace('-', " "),
        config: config.clone(),
        ca: Some(certs.join("ca.pem")),
        force: false,
        bits: 2048,
        timeout: Duration::from_secs(10),
        proxy: None,
    };
    let done = enrol::enrol(&request).await.expect("enrol");
    assert_eq!(done.clinic_id, "clinic-new");
    assert!(done.complete_config);
    assert!(
        done.config_problems.is_empty(),
        "{:?}",
        done.config_problems
    );
    // The key was made here and is private to the service account.
    let key_path = pc.join(enrol::KEY_FILE);
    let cert_path = pc.join(enrol::CERT_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let cert =
        openssl::x509::X509::from_pem(&std::fs::read(&cert_path).expect("cert")).expect("pem");
    let cn = cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
        .map(|s| s.to_string());
    // Named after the code's clinic, whatever the request asked for.
    assert_eq!(cn.as_deref(), Some("clinic-new"));
    assert_eq!(
        registry_kids(&fleet, "clinic-new").await,
        vec![done.kid.clone()]
    );
    let (_, reg) = get_as(Some(&fleet), &format!("{base}/v1/registry/clinics")).await;
    let entry = reg["clinics"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["clinic_id"] == "clinic-new")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(entry["labels"]["region"], "north", "{entry}");

    // The same code again (another PC, or a replay): refused, and nothing changes.
    let again = EnrolRequest {
        config: dir.path().join("pc2/config.yaml"),
        ..request.clone()
    };
    let err = enrol::enrol(&again).await.expect_err("a used code");
    let text = err.to_string();
    assert!(text.contains("403") && text.contains("`code`"), "{text}");
    assert!(!dir.path().join("pc2/config.yaml").exists());
    assert_eq!(registry_kids(&fleet, "clinic-new").await.len(), 1);
    // Not a code at all; a request whose signature is not its key's.
    let (status, v) =
        post_json_tls(&fleet, "/v1/enrol", &json!({"code": "hello", "csr": csr()})).await;
    assert_eq!((status, v["field"].as_str()), (400, Some("code")), "{v}");
    let (status, v) = post_json_tls(
        &fleet,
        "/v1/enrol",
        &json!({"code": tether::gateway::enrolment::new_code(), "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}),
    )
    .await;
    assert_eq!((status, v["field"].as_str()), (400, Some("csr")), "{v}");
    let audit = read_log(dir.path(), "audit");
    assert!(
        audit.contains("event=clinic_enrolled clinic=clinic-new"),
        "{audit}"
    );
    assert!(
        audit.contains("event=enrolment_refused") && audit.contains("reason=code_used"),
        "{audit}"
    );

    // The written config runs an agent: its changes arrive under clinic-new.
    let cfg = tether::config::Config::load(&config)
        .expect("config")
        .agent
        .expect("agent section");
    assert!(cfg.gateway.auth.as_ref().is_some_and(|a| a.kid.is_empty()));
    let agent = start_agent(&cfg).await.expect("agent");
    write_activity(&pc.join("clinic.db"), 10);
    wait_until(
        "clinic-new's first events at the gateway",
        Duration::from_secs(30),
        || {
            let n = events_of(&fleet, "clinic-new");
            async move { n > 0 }
        },
    )
    .await;
    eprintln!(
        "enrolment to first event at the gateway: {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    // Renewal on the agent's schedule: due at once (renew before more than the validity).
    let old_kid = done.kid.clone();
    let old_key = dir.path().join("old.key");
    let old_cert = dir.path().join("old.pem");
    std::fs::copy(&key_path, &old_key).expect("keep old key");
    std::fs::copy(&cert_path, &old_cert).expect("keep old cert");
    assert_eq!(
        handshake_status(&fleet, "clinic-new", &old_cert, &old_key).await,
        101
    );
    let renewal = actix_rt::spawn(enrol::renewal_loop(
        cfg.clone(),
        Duration::from_secs(1000 * 86_400),
        Duration::from_secs(3600),
    ));
    wait_until(
        "the old key to be retired at the gateway",
        Duration::from_secs(60),
        || {
            let (f, old) = (&fleet, old_kid.clone());
            async move {
                let kids = registry_kids(f, "clinic-new").await;
                kids.len() == 1 && kids[0] != old
            }
        },
    )
    .await;
    renewal.abort();
    let kids = registry_kids(&fleet, "clinic-new").await;
    assert!(
        !kids.contains(&old_kid),
        "old kid {old_kid} still in {kids:?}"
    );
    let new_kid = kids[0].clone();
    assert_ne!(new_kid, old_kid);
    assert!(!pc.join("identity/clinic.key.retire").exists());
    // The old key is refused at the handshake; the new one (now in the files) is admitted.
    assert_eq!(
        handshake_status(&fleet, "clinic-new", &old_cert, &old_key).await,
        401
    );
    assert_eq!(
        handshake_status(&fleet, "clinic-new", &cert_path, &key_path).await,
        101
    );
    // The running agent picked up the new files: its changes keep arriving.
    let before = events_of(&fleet, "clinic-new");
    write_activity(&pc.join("clinic.db"), 10);
    wait_until("changes after the renewal", Duration::from_secs(30), || {
        let n = events_of(&fleet, "clinic-new");
        async move { n > before }
    })
    .await;
    let audit = read_log(dir.path(), "audit");
    assert!(
        audit.contains(&format!("event=identity_reloaded kid={new_kid}")),
        "{audit}"
    );
    assert!(
        audit.contains(&format!(
            "event=keys_retired clinic=clinic-new kids=\"{old_kid}\""
        )),
        "{audit}"
    );
    if std::env::var_os("TETHER_TEST_SHOW_LOG").is_some() {
        eprintln!("{audit}");
    }
    agent.stop();
    fleet.stop().await;
}

/// A clinic holds at most a few keys: a fifth enrolment (a leaked code, a loop of
/// re-installs) is refused with 409 and its code given back; a revoked clinic gets no new key.
#[actix_rt::test]
async fn a_clinic_gets_no_more_keys_than_the_cap_and_a_refused_code_stays_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let fleet = Fleet::new(dir.path(), 1, HB).expect("fleet");
    let base = fleet.http_url();
    let code = || async {
        let (status, v) = post_as(
            Some(&fleet),
            &format!("{base}/v1/registry/clinics/clinic-cap/enrolment-codes"),
            &json!({}),
        )
        .await;
        assert_eq!(status, 201, "{v}");
        v["code"].as_str().expect("code").to_string()
    };
    let cap = tether::gateway::enrolment::MAX_KEYS_PER_CLINIC;
    for _ in 0..cap {
        let (status, v) = post_json_tls(
            &fleet,
            "/v1/enrol",
            &json!({"code": code().await, "csr": csr()}),
        )
        .await;
        assert_eq!(status, 201, "{v}");
    }
    assert_eq!(registry_kids(&fleet, "clinic-cap").await.len(), cap);
    let last = code().await;
    let (status, v) =
        post_json_tls(&fleet, "/v1/enrol", &json!({"code": last, "csr": csr()})).await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("retire old ones first"),
        "{v}"
    );
    assert_eq!(registry_kids(&fleet, "clinic-cap").await.len(), cap);
    // The operator clears the clinic's keys: the refused code works now.
    let client = fleet.rest_client().expect("client");
    let resp = fleet
        .authorize(client.delete(format!("{base}/v1/registry/clinics/clinic-cap")))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 204);
    let (status, v) =
        post_json_tls(&fleet, "/v1/enrol", &json!({"code": last, "csr": csr()})).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(registry_kids(&fleet, "clinic-cap").await.len(), 1);
    fleet.stop().await;
}

fn csr() -> String {
    let key = tether::security::keys::rsa_key(2048).expect("key");
    tether::security::keys::csr("x", &key).expect("csr")
}

/// A POST without an admin token (enrolment is public), trusting the fleet's CA.
async fn post_json_tls(fleet: &Fleet, path: &str, body: &Value) -> (u16, Value) {
    let client = fleet.rest_client().expect("client");
    let mut resp = client
        .post(format!("{}{path}", fleet.http_url()))
        .send_json(body)
        .await
        .expect("response");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn pg_url() -> String {
    std::env::var("TETHER_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

async fn post_at(fleet: &Fleet, base: &str, path: &str, body: &Value) -> (u16, Value) {
    post_as(Some(fleet), &format!("{base}{path}"), body).await
}

/// Two gateway nodes on one PostgreSQL store keep the registry in the store: a code issued on
/// node A is taken at node B, and works nowhere again; the clinic enrolled at B connects to A
/// within moments (A hears of the change); its entry deleted at B closes its session on A at
/// once and A refuses its next handshake.
#[cfg(feature = "postgres")]
#[actix_rt::test]
async fn in_a_cluster_the_registry_lives_in_the_store_and_every_node_follows_it() {
    use tether::gateway::store::StoreLocation;
    let dir = tempfile::tempdir().expect("tempdir");
    init_logs(dir.path());
    let schema = format!("enrol_{}_{:x}", std::process::id(), rand::random::<u32>());
    let fleet = Fleet::build_on(
        dir.path(),
        1,
        HB,
        Some(2048),
        Some(StoreLocation::Postgres {
            url: pg_url(),
            schema: schema.clone(),
        }),
        Some("gw-a"),
    )
    .expect("fleet (is PostgreSQL running?)");
    let b = fleet.start_peer("gw-b").expect("node b");
    let certs = fleet.certs.clone().expect("certs");
    let (a_url, b_url) = (fleet.http_url(), b.http_url());
    // The files were imported into the store once; both nodes list the same registry.
    assert_eq!(
        registry_kids(&fleet, "clinic-001").await,
        vec!["clinic-001-1"]
    );
    let (_, listed_b) = get_as(Some(&fleet), &format!("{b_url}/v1/registry/clinics")).await;
    assert_eq!(
        listed_b["clinics"][0]["file"], "store:clinic-001",
        "{listed_b}"
    );

    let (status, issued) = post_at(
        &fleet,
        &a_url,
        "/v1/registry/clinics/clinic-far/enrolment-codes",
        &json!({}),
    )
    .await;
    assert_eq!(status, 201, "{issued}");
    let code = issued["code"].as_str().expect("code").to_string();
    let pc = dir.path().join("pc");
    std::fs::create_dir_all(&pc).expect("pc");
    create_sample_clinic(&pc.join("clinic.db")).expect("db");
    let enrolled = enrol::enrol(&EnrolRequest {
        gateway: b_url.clone(),
        code: code.clone(),
        config: pc.join("config.yaml"),
        ca: Some(certs.join("ca.pem")),
        force: false,
        bits: 2048,
        timeout: Duration::from_secs(10),
        proxy: None,
    })
    .await
    .expect("enrol at node b");
    let t_enrolled = Instant::now();
    // Once across the cluster: node A refuses the code node B took.
    let (status, v) =
        post_json_tls(&fleet, "/v1/enrol", &json!({"code": code, "csr": csr()})).await;
    assert_eq!((status, v["field"].as_str()), (403, Some("code")), "{v}");

    // The agent goes to node A, which learnt of the clinic from the store.
    let mut cfg = tether::config::Config::load(&pc.join("config.yaml"))
        .expect("config")
        .agent
        .expect("agent");
    cfg.gateway.url = fleet.gateway.as_ref().expect("a").ws_url();
    let agent = start_agent(&cfg).await.expect("agent");
    write_activity(&pc.join("clinic.db"), 5);
    wait_until(
        "clinic-far's events stored through node A",
        Duration::from_secs(30),
        || {
            let n = events_of(&fleet, "clinic-far");
            async move { n > 0 }
        },
    )
    .await;
    eprintln!(
        "enrolled at node B to first event through node A: {:.2} s",
        t_enrolled.elapsed().as_secs_f64()
    );
    assert!(
        registry_kids(&fleet, "clinic-far").await == vec![enrolled.kid.clone()],
        "node A's registry has the key enrolled at node B"
    );

    // Deleted at node B: node A closes the live session and refuses the next handshake.
    let client = fleet.rest_client().expect("client");
    let t_deleted = Instant::now();
    let resp = fleet
        .authorize(client.delete(format!("{b_url}/v1/registry/clinics/clinic-far")))
        .send()
        .await
        .expect("delete at b");
    assert_eq!(resp.status().as_u16(), 204);
    wait_until(
        "node A to close clinic-far's session",
        Duration::from_secs(10),
        || {
            let log = read_log(dir.path(), "audit");
            async move {
                log.lines()
                    .any(|l| l.contains("event=session_revoked") && l.contains("clinic=clinic-far"))
            }
        },
    )
    .await;
    eprintln!(
        "deleted at node B to the session closed on node A: {:.2} s",
        t_deleted.elapsed().as_secs_f64()
    );
    assert_eq!(
        handshake_status(
            &fleet,
            "clinic-far",
            &pc.join(enrol::CERT_FILE),
            &pc.join(enrol::KEY_FILE)
        )
        .await,
        401
    );
    agent.stop();
    b.stop().await;
    fleet.stop().await;
    let _ = std::thread::spawn(move || {
        if let Ok(mut c) = postgres::Client::connect(&pg_url(), postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    })
    .join();
}

//! A gateway and N clinic agents in one process, on SQLite files in a directory, with a
//! realistic sample schema and an activity generator. Used by `tether demo` and by the
//! integration tests; each agent runs on its own arbiter (thread) so it can be stopped alone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use rand::Rng;
use rusqlite::{params, Connection};
use tether_actors::agent::AgentHandle;

use crate::config::{AgentConfig, Direction, TableConfig};
use crate::db::sqlite;
use crate::gateway::{self, GatewayHandle, GatewaySecurity, GatewaySettings};
use crate::security::jwt::{ClinicRegistry, TokenVerifier};
use crate::security::tls::ServerTls;
use crate::security::{admin, keys};

/// The gateway id (token audience) of fleets and demos.
pub const GATEWAY_ID: &str = "gw-local";

/// Cloud-created sample rows use negative ids, which SQLite never assigns on its own, so any
/// clinic change captured for such a key is an echo of a cloud update.
pub fn cloud_id(n: u64) -> i64 {
    -(n as i64) - 1
}

pub const SAMPLE_SCHEMA: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS patients (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    national_id TEXT,
    dob TEXT,
    phone TEXT,
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS appointments (
    id INTEGER PRIMARY KEY,
    patient_id INTEGER NOT NULL,
    starts_at TEXT NOT NULL,
    status TEXT NOT NULL,
    notes TEXT
);
CREATE TABLE IF NOT EXISTS payments (
    id INTEGER PRIMARY KEY,
    patient_id INTEGER NOT NULL,
    amount_cents INTEGER NOT NULL,
    method TEXT NOT NULL,
    paid_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
";

pub fn sample_tables() -> Vec<TableConfig> {
    vec![
        TableConfig::new("patients", "patient", &["id"], Direction::Both),
        TableConfig::new("appointments", "appointment", &["id"], Direction::Both),
        TableConfig::new("payments", "payment", &["id"], Direction::Up),
    ]
}

/// Creates the sample clinic schema and installs Tether in it.
pub fn create_sample_clinic(path: &Path) -> anyhow::Result<()> {
    let conn = sqlite::open(path)?;
    conn.execute_batch(SAMPLE_SCHEMA)?;
    drop(conn);
    sqlite::install(path, &sample_tables())?;
    Ok(())
}

const FIRST: [&str; 10] = [
    "Ana", "Ben", "Chloe", "Dev", "Eva", "Femi", "Gus", "Hana", "Ivo", "Jia",
];
const LAST: [&str; 8] = [
    "Silva", "Okafor", "Nguyen", "Muller", "Haddad", "Kowalski", "Sato", "Reyes",
];

/// One step of clinic activity: a realistic mix of single-row, multi-row and multi-statement
/// transactions. Returns the number of statements committed (not rows).
pub fn clinic_step(conn: &mut Connection, rng: &mut impl Rng) -> rusqlite::Result<u64> {
    let roll: u32 = rng.random_range(0..100);
    let max_patient: i64 = conn.query_row(
        "SELECT coalesce(max(id), 0) FROM patients WHERE id > 0",
        [],
        |r| r.get(0),
    )?;
    let pid = if max_patient > 0 {
        rng.random_range(1..=max_patient)
    } else {
        0
    };
    let name = format!(
        "{} {}",
        FIRST[rng.random_range(0..FIRST.len())],
        LAST[rng.random_range(0..LAST.len())]
    );
    match roll {
        0..=29 => {
            conn.execute(
                "INSERT INTO patients (name, national_id, dob, phone) VALUES (?1, ?2, ?3, ?4)",
                params![
                    name,
                    format!("NID-{:09}", rng.random_range(0..1_000_000_000u64)),
                    format!(
                        "19{:02}-0{}-1{}",
                        rng.random_range(40..99),
                        rng.random_range(1..9),
                        rng.random_range(0..9)
                    ),
                    format!("+1-555-{:04}", rng.random_range(0..10_000))
                ],
            )?;
        }
        30..=59 if pid > 0 => {
            conn.execute(
                "INSERT INTO appointments (patient_id, starts_at, status) VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2), 'booked')",
                params![pid, format!("+{} hours", rng.random_range(1..500))],
            )?;
        }
        60..=74 => {
            conn.execute(
                "UPDATE appointments SET status = ?1 WHERE id = (SELECT id FROM appointments ORDER BY random() LIMIT 1)",
                params![["confirmed", "arrived", "completed", "no_show"][rng.random_range(0..4)]],
            )?;
        }
        75..=84 if pid > 0 => {
            conn.execute(
                "INSERT INTO payments (patient_id, amount_cents, method) VALUES (?1, ?2, ?3)",
                params![
                    pid,
                    rng.random_range(500..50_000),
                    ["card", "cash", "insurance"][rng.random_range(0..3)]
                ],
            )?;
        }
        85..=89 => {
            conn.execute(
                "DELETE FROM appointments WHERE id = (SELECT id FROM appointments WHERE status = 'booked' ORDER BY random() LIMIT 1)",
                [],
            )?;
        }
        90..=94 if pid > 0 => {
            // A multi-row statement: one UPDATE touching every appointment of a patient.
            conn.execute(
                "UPDATE appointments SET notes = ?2 WHERE patient_id = ?1",
                params![pid, format!("reminder sent #{}", rng.random_range(0..1000))],
            )?;
        }
        _ => {
            // A multi-statement transaction: registration, booking and payment together.
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO patients (name, phone) VALUES (?1, ?2)",
                params![name, format!("+1-555-{:04}", rng.random_range(0..10_000))],
            )?;
            let new_id = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO appointments (patient_id, starts_at, status) VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+1 day'), 'booked')",
                params![new_id],
            )?;
            tx.execute(
                "INSERT INTO payments (patient_id, amount_cents, method) VALUES (?1, 2500, 'card')",
                params![new_id],
            )?;
            tx.commit()?;
        }
    }
    Ok(1)
}

/// Writes clinic activity at `rate` steps per second on its own thread until stopped.
pub struct Generator {
    stop: Arc<AtomicBool>,
    pub steps: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Generator {
    pub fn start(db: PathBuf, rate: f64) -> anyhow::Result<Generator> {
        let stop = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(AtomicU64::new(0));
        let mut conn = sqlite::open(&db)?;
        let (s, n) = (stop.clone(), steps.clone());
        let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let thread = std::thread::Builder::new()
            .name("clinic-activity".into())
            .spawn(move || {
                let mut rng = rand::rng();
                let mut next = std::time::Instant::now();
                while !s.load(Ordering::Relaxed) {
                    match clinic_step(&mut conn, &mut rng) {
                        Ok(k) => {
                            n.fetch_add(k, Ordering::Relaxed);
                        }
                        Err(e) => {
                            log::warn!(target: "error", "event=demo_write_failed error={e}");
                        }
                    }
                    // Pacing the load generator, not synchronising with it.
                    next += period;
                    let now = std::time::Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            })?;
        Ok(Generator {
            stop,
            steps,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An agent running on its own arbiter.
pub struct RunningAgent {
    pub handle: AgentHandle,
    /// The agent's channel board (what its local endpoint serves).
    pub channels: Arc<tether_actors::channels::ChannelBoard>,
    arbiter: Arbiter,
}

impl RunningAgent {
    pub fn stop(self) {
        self.handle.shutdown();
        self.arbiter.stop();
    }
}

pub struct Clinic {
    pub id: String,
    pub db: PathBuf,
    pub config: AgentConfig,
    pub agent: Option<RunningAgent>,
}

/// Fast timings for demos and tests; TLS + token + field encryption when `certs` is given
/// (a directory made by [`keys::dev_setup`]).
pub fn quick_agent_config(
    clinic_id: &str,
    db: &Path,
    gateway_url: &str,
    certs: Option<&Path>,
) -> anyhow::Result<AgentConfig> {
    let security = match certs {
        None => "    insecure_plaintext: true\n".to_string(),
        Some(c) => format!(
            "    tls:\n      ca: {ca}\n      cert: {cert}\n      key: {key}\n    auth:\n      kid: {clinic_id}-1\n      token_lifetime: 5m\n",
            ca = c.join("ca.pem").display(),
            cert = c.join(format!("{clinic_id}.pem")).display(),
            key = c.join(format!("{clinic_id}.key")).display(),
        ),
    };
    let encryption = match certs {
        None => String::new(),
        Some(c) => format!(
            "  encryption:\n    keys:\n      - {{kid: dk1, file: {}}}\n    active: dk1\n    fields:\n      patient: [name, national_id]\n",
            c.join("dk1.key").display()
        ),
    };
    let yaml = format!(
        "agent:\n  clinic_id: {clinic_id}\n  database:\n    path: {db}\n{encryption}  gateway:\n    url: {gateway_url}\n{security}    heartbeat_interval: 500ms\n    connect_timeout: 2s\n    backoff:\n      initial: 50ms\n      max: 1s\n      reset_after: 5s\n  outbox:\n    poll_interval: 20ms\n    purge_interval: 1h\n  tables:\n    - {{table: patients, entity: patient, key: [id], direction: both}}\n    - {{table: appointments, entity: appointment, key: [id], direction: both}}\n    - {{table: payments, entity: payment, key: [id], direction: up}}\n",
        db = db.display()
    );
    crate::config::Config::parse(&yaml, "quick_agent_config")?
        .agent
        .ok_or_else(|| anyhow::anyhow!("quick_agent_config: no agent section"))
}

/// Starts an agent for `clinic` on a new arbiter. Call inside an actix System.
pub async fn start_agent(cfg: &AgentConfig) -> anyhow::Result<RunningAgent> {
    let settings = crate::agent::settings(cfg);
    // Opening database connections blocks: do it on the blocking pool.
    let c = cfg.clone();
    let ports = tokio::task::spawn_blocking(move || crate::agent::ports(&c)).await??;
    let channels = ports.channels.clone();
    let arbiter = Arbiter::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = arbiter.spawn_fn(move || {
        let _ = tx.send(tether_actors::start_agent(settings, ports));
    });
    if !spawned {
        anyhow::bail!("agent arbiter is not running");
    }
    let handle = rx.await?;
    Ok(RunningAgent {
        handle,
        channels,
        arbiter,
    })
}

/// What a local subscriber received: each message's JSON and when it arrived.
pub type Inbox = Arc<std::sync::Mutex<Vec<(serde_json::Value, std::time::Instant)>>>;

/// A front desk: subscribes to `names` (comma-separated; all down channels when empty) over
/// Server-Sent Events on an agent's local endpoint, retrying while the agent has not heard the
/// gateway's channels yet (503, up to 30 s). Messages land in the inbox as they arrive.
pub async fn subscribe_sse(addr: SocketAddr, token: &str, names: &str) -> anyhow::Result<Inbox> {
    use futures_util::StreamExt;
    // The client lives as long as the stream it reads.
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(24 * 3600))
        .finish();
    let url = format!("http://{addr}/v1/channels?names={names}&access_token={token}");
    let t0 = std::time::Instant::now();
    let resp = loop {
        let r = client
            .get(&url)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("subscribe at {addr}: {e}"))?;
        match r.status().as_u16() {
            200 => break r,
            503 if t0.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            s => anyhow::bail!("subscribe at {addr}: status {s}"),
        }
    };
    let inbox: Inbox = Arc::default();
    let sink = inbox.clone();
    actix::spawn(async move {
        let (_client, mut resp) = (client, resp);
        let mut buf = String::new();
        while let Some(Ok(chunk)) = resp.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                if let Ok(v) = serde_json::from_str(data) {
                    if let Ok(mut i) = sink.lock() {
                        i.push((v, std::time::Instant::now()));
                    }
                }
            }
        }
    });
    Ok(inbox)
}

/// Serves `clinic`'s local admin endpoint (with channels, token `token`) on 127.0.0.1:0, as
/// the agent service does; answers its address. Call inside an actix System, agent started.
pub async fn serve_local_endpoint(clinic: &Clinic, token: &str) -> anyhow::Result<SocketAddr> {
    let agent = clinic
        .agent
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{}: agent not started", clinic.id))?;
    let c = clinic.config.clone();
    let (source, checkpoint, _) =
        tokio::task::spawn_blocking(move || crate::agent::db_ports(&c)).await??;
    let state = crate::admin::AdminState {
        clinic_id: clinic.id.clone(),
        gateway_url: clinic.config.gateway.url.clone(),
        proxy: "none".into(),
        stats: agent.handle.stats.clone(),
        source,
        checkpoint,
        started: std::time::Instant::now(),
        ready_lag: Duration::from_secs(10),
        slots: Some(agent.handle.slots.clone()),
        certificate: None,
        channels: Some(crate::local_channels::LocalChannels {
            board: agent.channels.clone(),
            token: token.to_string(),
        }),
    };
    let listener = crate::admin::bind("127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr()?;
    actix::spawn(crate::admin::serve(listener, Arc::new(state)));
    Ok(addr)
}

/// The sample channels as a secure fleet carries them, like production: the caller's number
/// and patient of a call pop, and the appointment of a check-in, encrypted under the data key.
pub fn encrypted_samples() -> Vec<crate::gateway::channels::ChannelSpec> {
    let mut specs = crate::gateway::channels::samples();
    for s in &mut specs {
        s.def.encrypt = match s.def.name.as_str() {
            "voip.call" => vec!["caller".into(), "patient_id".into()],
            "frontdesk.checkin" => vec!["appointment_id".into()],
            _ => Vec::new(),
        };
    }
    specs
}

/// The gateway's security for a fleet whose keys are in `certs` (made by [`keys::dev_setup`]):
/// mutual TLS, clinic tokens, the admin token `token`, field decryption.
/// With `store_registry` (fleets on PostgreSQL, several nodes) the clinic registry is kept in
/// the store, imported from `certs/clinics` by the first node to start.
fn secure(certs: &Path, token: &str, store_registry: bool) -> anyhow::Result<GatewaySecurity> {
    let mut data = crate::security::crypto::DataKeys::default();
    data.add_file("dk1", &certs.join("dk1.key"))?;
    data.set_active("dk1")?;
    Ok(GatewaySecurity {
        tls: Some(ServerTls {
            cert: certs.join("gateway.pem"),
            key: certs.join("gateway.key"),
            client_ca: Some(certs.join("ca.pem")),
        }),
        verifier: Some(TokenVerifier::new(
            GATEWAY_ID,
            Duration::from_secs(30),
            if store_registry {
                ClinicRegistry::default()
            } else {
                ClinicRegistry::load_dir(&certs.join("clinics"))?
            },
        )),
        registry_source: Some(crate::gateway::clinic_registry::RegistrySource {
            dir: certs.join("clinics"),
            interval: Duration::from_millis(250),
            store: store_registry,
        }),
        admin: Some(
            admin::AdminTokens::new(&[admin::AdminTokenConfig {
                name: "fleet-admin".into(),
                sha256: admin::sha256_hex(token),
                scopes: vec![admin::Scope::Read, admin::Scope::Write],
            }])
            .map_err(|e| anyhow::anyhow!("admin token {e}"))?,
        ),
        decrypt: Some(crate::security::crypto::FieldCipher::new(
            data,
            Default::default(),
        )),
        enrolment: Some(Arc::new(crate::gateway::enrolment::Enrolment::from_config(
            &enrolment_config(certs)?,
            GATEWAY_ID,
        )?)),
        ..GatewaySecurity::insecure()
    })
}

/// The fleet's enrolment: its dev CA signs enrolled clinics, and a clinic gets a config for
/// `clinic.db` beside it with the sample tables (the template is written to `certs`).
fn enrolment_config(certs: &Path) -> anyhow::Result<crate::config::EnrolmentConfig> {
    let template = format!(
        "agent:\n  clinic_id: {{{{clinic_id}}}}\n  database:\n    path: clinic.db\n  encryption:\n    keys:\n      - {{kid: dk1, file: {dk}}}\n    active: dk1\n    fields:\n      patient: [name, national_id]\n  gateway:\n    url: {{{{gateway_url}}}}\n    gateway_id: {{{{gateway_id}}}}\n    tls:\n      ca: identity/gateway-ca.pem\n      cert: identity/clinic.pem\n      key: identity/clinic.key\n    auth:\n      token_lifetime: 5m\n    heartbeat_interval: 500ms\n    connect_timeout: 2s\n    backoff:\n      initial: 50ms\n      max: 1s\n      reset_after: 5s\n  outbox:\n    poll_interval: 20ms\n    purge_interval: 1h\n  admin:\n    listen: \"off\"\n  tables:\n    - {{table: patients, entity: patient, key: [id], direction: both}}\n    - {{table: appointments, entity: appointment, key: [id], direction: both}}\n    - {{table: payments, entity: payment, key: [id], direction: up}}\n",
        dk = certs.join("dk1.key").display()
    );
    let path = certs.join("agent-template.yaml");
    std::fs::write(&path, template)?;
    let mut e = crate::config::EnrolmentConfig::default();
    e.ca_cert = certs.join("ca.pem");
    e.ca_key = certs.join("ca.key");
    e.agent_template = Some(path);
    e.server_ca = Some(certs.join("ca.pem"));
    Ok(e)
}

pub struct Fleet {
    pub dir: PathBuf,
    /// Where the CA, certificates, registry entries and data key are (secure fleets).
    pub certs: Option<PathBuf>,
    /// Bearer token for the REST API (secure fleets).
    pub admin_token: Option<String>,
    pub gateway: Option<GatewayHandle>,
    pub gateway_settings: GatewaySettings,
    pub clinics: Vec<Clinic>,
}

impl Fleet {
    /// A gateway on 127.0.0.1:0 over mutual TLS with clinic tokens, admin tokens and field
    /// encryption, and `n` clinics (databases created, agents not started).
    pub fn new(dir: &Path, n: usize, heartbeat: Duration) -> anyhow::Result<Fleet> {
        Fleet::build(dir, n, heartbeat, Some(2048))
    }

    /// The same without TLS, tokens or encryption.
    pub fn insecure(dir: &Path, n: usize, heartbeat: Duration) -> anyhow::Result<Fleet> {
        Fleet::build(dir, n, heartbeat, None)
    }

    /// `key_bits: None` makes an insecure fleet.
    pub fn build(
        dir: &Path,
        n: usize,
        heartbeat: Duration,
        key_bits: Option<u32>,
    ) -> anyhow::Result<Fleet> {
        Fleet::build_on(dir, n, heartbeat, key_bits, None, None)
    }

    /// `store: None` keeps the gateway's store in `dir/gateway.db` (SQLite); `node_id: None`
    /// names the gateway node `<host>:<port>`.
    pub fn build_on(
        dir: &Path,
        n: usize,
        heartbeat: Duration,
        key_bits: Option<u32>,
        store: Option<crate::gateway::store::StoreLocation>,
        node_id: Option<&str>,
    ) -> anyhow::Result<Fleet> {
        let ids: Vec<String> = (1..=n).map(|i| format!("clinic-{i:03}")).collect();
        let mut settings = GatewaySettings {
            node_id: node_id.map(str::to_string),
            advertise: None,
            listen: "127.0.0.1:0".into(),
            store: store.unwrap_or_else(|| {
                crate::gateway::store::StoreLocation::Sqlite(dir.join("gateway.db"))
            }),
            retention: None,
            heartbeat_interval: heartbeat,
            max_frame_bytes: tether_schemas::DEFAULT_MAX_FRAME_BYTES,
            entity_schemas: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/entities")),
            update_window: 32,
            group_commit_max_events: 20_000,
            workers: 2,
            shutdown_timeout: Duration::from_secs(1),
            faults: Default::default(),
            webhooks: Vec::new(),
            bridge: Default::default(),
            channels: crate::gateway::channels::samples(),
        };
        if key_bits.is_some() {
            settings.channels = encrypted_samples();
        }
        let (security, certs, admin_token) = match key_bits {
            None => (GatewaySecurity::insecure(), None, None),
            Some(bits) => {
                let certs = dir.join("certs");
                keys::dev_setup(&certs, &ids, bits)?;
                let token = admin::new_token();
                let shared = matches!(
                    settings.store,
                    crate::gateway::store::StoreLocation::Postgres { .. }
                );
                (secure(&certs, &token, shared)?, Some(certs), Some(token))
            }
        };
        let gw = gateway::start(settings.clone(), security)?;
        let url = gw.ws_url();
        let mut clinics = Vec::new();
        for id in ids {
            let db = dir.join(format!("{id}.db"));
            create_sample_clinic(&db)?;
            let config = quick_agent_config(&id, &db, &url, certs.as_deref())?;
            clinics.push(Clinic {
                id,
                db,
                config,
                agent: None,
            });
        }
        Ok(Fleet {
            dir: dir.to_path_buf(),
            certs,
            admin_token,
            gateway: Some(gw),
            gateway_settings: settings,
            clinics,
        })
    }

    /// Another gateway node in this process on the fleet's store (PostgreSQL) with the same
    /// settings and security, as node `node_id`.
    pub fn start_peer(&self, node_id: &str) -> anyhow::Result<GatewayHandle> {
        let security = match (&self.certs, &self.admin_token) {
            (Some(c), Some(t)) => secure(
                c,
                t,
                matches!(
                    self.gateway_settings.store,
                    crate::gateway::store::StoreLocation::Postgres { .. }
                ),
            )?,
            _ => GatewaySecurity::insecure(),
        };
        let settings = GatewaySettings {
            node_id: Some(node_id.to_string()),
            ..self.gateway_settings.clone()
        };
        Ok(gateway::start(settings, security)?)
    }

    pub async fn start_agents(&mut self) -> anyhow::Result<()> {
        for c in &mut self.clinics {
            if c.agent.is_none() {
                c.agent = Some(start_agent(&c.config).await?);
            }
        }
        Ok(())
    }

    pub fn store(&self) -> Option<Arc<crate::gateway::store::Store>> {
        self.gateway.as_ref().map(|g| g.store.clone())
    }

    pub fn http_url(&self) -> String {
        self.gateway
            .as_ref()
            .map(|g| g.http_url())
            .unwrap_or_default()
    }

    /// An HTTP client that trusts the fleet's CA (REST calls).
    pub fn rest_client(&self) -> anyhow::Result<awc::Client> {
        let b = awc::Client::builder().timeout(Duration::from_secs(10));
        Ok(match &self.certs {
            None => b.finish(),
            Some(c) => {
                let conn = crate::security::tls::connector(&crate::security::tls::ClientTls {
                    ca: Some(c.join("ca.pem")),
                    ..Default::default()
                })?;
                b.connector(awc::Connector::new().openssl(conn)).finish()
            }
        })
    }

    /// A request with the admin bearer token when the fleet has one.
    pub fn authorize(&self, req: awc::ClientRequest) -> awc::ClientRequest {
        match &self.admin_token {
            Some(t) => req.insert_header(("Authorization", format!("Bearer {t}"))),
            None => req,
        }
    }

    /// Highest outbox sequence committed at a clinic.
    pub fn outbox_head(db: &Path) -> anyhow::Result<u64> {
        let conn = sqlite::open(db)?;
        Ok(conn.query_row(
            "SELECT coalesce(max(seq), 0) FROM _tether_outbox",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    pub async fn stop(mut self) {
        for c in &mut self.clinics {
            if let Some(a) = c.agent.take() {
                a.stop();
            }
        }
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
    }
}

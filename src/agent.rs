//! Agent wiring: config → settings + adapters → the supervised actors.

use std::collections::HashMap;
use std::sync::Arc;

use tether_actors::agent::{AgentPorts, AgentSettings, Transport};
use tether_actors::ports::ChangeSource;
use tether_actors::supervisor::RestartPolicy;
use tether_actors::SystemClock;

use crate::config::AgentConfig;
use crate::db::sqlite::{SqliteCheckpoint, SqliteSink, SqliteSource};
use crate::security::crypto::{ChannelCipher, EncryptingSource, FieldCipher};
use crate::security::dialer::SecureDialer;
use crate::security::jwt::TokenSigner;
use crate::security::tls::{self, ClientTls};

#[derive(Debug, thiserror::Error)]
pub enum AgentSetupError {
    #[error(transparent)]
    Sqlite(#[from] crate::db::sqlite::SqliteError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("agent.gateway.auth: {0}")]
    Jwt(#[from] crate::security::jwt::JwtError),
    #[error("agent.encryption: {0}")]
    Crypto(#[from] crate::security::crypto::CryptoError),
    #[error("agent.gateway.tls.pkcs12_password_env: variable {0} is not set")]
    Env(String),
    #[error("agent.database.password_env: variable {0} is not set")]
    DbPasswordEnv(String),
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] crate::db::postgres::PgError),
    #[cfg(feature = "sqlserver")]
    #[error(transparent)]
    SqlServer(#[from] crate::db::sqlserver::MssqlError),
    #[error("agent.database.kind: this build has no {0} support (cargo feature `{0}`)")]
    Unsupported(&'static str),
    #[error("agent.database.path {0}: no such file (the agent never creates the clinic's database: check the path)")]
    NoDatabase(String),
    #[error("agent.rpc.queries: this build has no {0} support for them (cargo feature `{0}`)")]
    RpcUnsupported(String),
    #[error("agent.tables: no table `{0}`")]
    UnknownTable(String),
    #[error("agent.database: {0}")]
    Port(tether_actors::PortError),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error("agent.gateway.proxy.password_env: variable {0} is not set")]
    ProxyPasswordEnv(String),
    #[error("agent.database: {0}")]
    Instance(#[from] crate::db::instance::InstanceError),
    #[error("agent.gateway.proxy.password_file: {0}: {1}")]
    ProxyPasswordFile(String, std::io::Error),
}

/// The connection string with the password from `password_env` added.
pub fn connection_string(a: &AgentConfig) -> Result<String, AgentSetupError> {
    let d = &a.database;
    let mut s = d.connection.clone();
    if let Some(var) = &d.password_env {
        let pw = std::env::var(var).map_err(|_| AgentSetupError::DbPasswordEnv(var.clone()))?;
        match d.kind.as_str() {
            #[cfg(feature = "postgres")]
            "postgres" => {
                s = format!(
                    "{s} password='{}'",
                    pw.replace('\\', "\\\\").replace('\'', "\\'")
                )
            }
            _ => s = format!("{s};password={{{}}}", pw.replace('}', "}}")),
        }
    }
    Ok(s)
}

/// The connection RPC queries run on: `agent.rpc.connection` (a read replica; SQL Server with
/// `ApplicationIntent=ReadOnly` added unless set), else the database's own.
pub fn rpc_connection_string(a: &AgentConfig) -> Result<String, AgentSetupError> {
    let Some(replica) = &a.rpc.connection else {
        return connection_string(a);
    };
    let mut own = a.clone();
    own.database.connection = replica.clone();
    let mut s = connection_string(&own)?;
    let has_intent = s.split(';').any(|kv| {
        kv.trim()
            .to_ascii_lowercase()
            .starts_with("applicationintent")
    });
    if a.database.kind == "sqlserver" && !has_intent {
        s = format!("{};ApplicationIntent=ReadOnly", s.trim_end_matches(';'));
    }
    Ok(s)
}

#[cfg(feature = "sqlserver")]
fn mssql(
    a: &AgentConfig,
) -> Result<std::sync::Arc<crate::db::sqlserver::MssqlDb>, AgentSetupError> {
    Ok(crate::db::sqlserver::MssqlDb::connect(
        &connection_string(a)?,
        a.database.ca.as_deref(),
        a.database.timeout.get(),
    )?)
}

/// `tether agent install`: creates the capture objects; returns a line for the user.
pub fn install(a: &AgentConfig) -> Result<String, AgentSetupError> {
    let d = &a.database;
    match d.kind.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" if d.capture == "logical" => {
            let n = crate::db::postgres::logical::install(&connection_string(a)?, &a.tables)?;
            Ok(format!(
                "installed schema tether, publication {} and a logical replication slot for {n} tables (REPLICA IDENTITY FULL; no triggers)",
                crate::db::postgres::logical::PUBLICATION
            ))
        }
        #[cfg(feature = "postgres")]
        "postgres" => {
            let n = crate::db::postgres::install(&connection_string(a)?, &a.tables)?;
            Ok(format!("installed schema tether and {n} capture triggers"))
        }
        #[cfg(feature = "sqlserver")]
        "sqlserver" if d.capture == "change_tracking" => {
            let db = mssql(a)?;
            db.batches(&crate::db::sqlserver::change_tracking_install_script(
                &a.tables, 7,
            ))?;
            Ok("installed schema tether and enabled Change Tracking (7-day retention)".into())
        }
        #[cfg(feature = "sqlserver")]
        "sqlserver" => {
            let db = mssql(a)?;
            db.batches(&crate::db::sqlserver::install_script(&a.tables))?;
            Ok("installed schema tether and the capture triggers".into())
        }
        #[cfg(not(feature = "postgres"))]
        "postgres" => Err(AgentSetupError::Unsupported("postgres")),
        #[cfg(not(feature = "sqlserver"))]
        "sqlserver" => Err(AgentSetupError::Unsupported("sqlserver")),
        _ => {
            sqlite_exists(&d.path)?;
            let r = crate::db::sqlite::install(&d.path, &a.tables)?;
            Ok(format!(
                "installed in {}: tables [{}], {} triggers",
                d.path.display(),
                r.tables.join(", "),
                r.triggers
            ))
        }
    }
}

/// `tether agent uninstall`: removes every object `install` created.
pub fn uninstall(a: &AgentConfig) -> Result<String, AgentSetupError> {
    let d = &a.database;
    match d.kind.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" => {
            crate::db::postgres::uninstall(&connection_string(a)?, &a.tables)?;
            Ok("removed schema tether and the capture triggers".into())
        }
        #[cfg(feature = "sqlserver")]
        "sqlserver" => {
            mssql(a)?.batches(&crate::db::sqlserver::uninstall_script(&a.tables))?;
            Ok("removed schema tether and the capture triggers".into())
        }
        #[cfg(not(feature = "postgres"))]
        "postgres" => Err(AgentSetupError::Unsupported("postgres")),
        #[cfg(not(feature = "sqlserver"))]
        "sqlserver" => Err(AgentSetupError::Unsupported("sqlserver")),
        _ => {
            sqlite_exists(&d.path)?;
            let n = crate::db::sqlite::uninstall(&d.path)?;
            Ok(format!("removed {n} objects from {}", d.path.display()))
        }
    }
}

/// Changes in the outbox that the gateway has not acknowledged (counted up to `limit`), read
/// through the same ports the agent uses. `uninstall` refuses to drop them without `--force`.
pub fn unsent(a: &AgentConfig, limit: usize) -> Result<usize, AgentSetupError> {
    let p = ports(a)?;
    let acked = p.checkpoint.load().map_err(AgentSetupError::Port)?;
    Ok(p.source
        .read_after(acked, limit)
        .map_err(AgentSetupError::Port)?
        .len())
}

/// `tether agent snapshot --table T`: queues every current row; returns (done, total).
pub fn snapshot(
    a: &AgentConfig,
    table: &str,
    chunk: usize,
    reset: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(u64, u64), AgentSetupError> {
    let t = a
        .tables
        .iter()
        .find(|t| t.table == table || t.entity == table)
        .ok_or_else(|| AgentSetupError::UnknownTable(table.to_string()))?;
    match a.database.kind.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" => {
            let conn = connection_string(a)?;
            if reset {
                let mut c = crate::db::postgres::connect(&conn)?;
                c.execute(
                    "DELETE FROM tether.state WHERE name = $1",
                    &[&format!("snapshot:{}", t.table)],
                )
                .map_err(|e| crate::db::postgres::PgError::Sql {
                    context: "reset".into(),
                    message: e.to_string(),
                })?;
            }
            let p = crate::db::postgres::snapshot(&conn, t, chunk as i64, &mut |p| {
                progress(p.done, p.total)
            })?;
            Ok((p.done, p.total))
        }
        #[cfg(feature = "sqlserver")]
        "sqlserver" => {
            use crate::db::sqlserver as ms;
            let db = mssql(a)?;
            if reset {
                db.batches(&[ms::reset_snapshot_sql(t)])?;
            }
            let sink = ms::MssqlSink::new(db.clone(), &a.tables);
            let types = sink
                .column_types(&t.table)
                .map_err(|e| ms::MssqlError::Sql(e.to_string()))?;
            let done = ms::snapshot(&db, t, &types, chunk as u32, &mut |n| progress(n, 0))?;
            Ok((done, done))
        }
        #[cfg(not(feature = "postgres"))]
        "postgres" => Err(AgentSetupError::Unsupported("postgres")),
        #[cfg(not(feature = "sqlserver"))]
        "sqlserver" => Err(AgentSetupError::Unsupported("sqlserver")),
        _ => {
            if reset {
                crate::db::sqlite::reset_snapshot(&a.database.path, &t.table)?;
            }
            let p = crate::db::sqlite::snapshot(&a.database.path, t, chunk, &mut |p| {
                progress(p.done, p.total)
            })?;
            Ok((p.done, p.total))
        }
    }
}

pub fn settings(a: &AgentConfig) -> AgentSettings {
    let mut s = AgentSettings::new(a.clinic_id.clone(), a.gateway.url.clone());
    s.heartbeat_interval = a.gateway.heartbeat_interval.get();
    s.connect_timeout = a.gateway.connect_timeout.get();
    s.backoff_base = a.gateway.backoff.initial.get();
    s.backoff_cap = a.gateway.backoff.max.get();
    s.backoff_stable_after = a.gateway.backoff.reset_after.get();
    s.max_frame_bytes = a.gateway.max_frame_bytes as usize;
    s.poll_interval = a.outbox.poll_interval.get();
    s.batch_max_events = a.outbox.batch_max_events as usize;
    s.batch_max_bytes = a.outbox.batch_max_bytes as usize;
    s.max_inflight_batches = a.outbox.max_inflight_batches as usize;
    s.max_buffered_events = a.outbox.max_buffered_events as usize;
    s.read_chunk = s.batch_max_events.max(100);
    s.outbox_retention = a.outbox.retention.get();
    s.purge_interval = a.outbox.purge_interval.get();
    s.restart = RestartPolicy::default();
    s.transport = Transport::parse(&a.gateway.transport).unwrap_or(Transport::Auto);
    s.fallback_after = a.gateway.fallback_after.clamp(1, u32::MAX as u64) as u32;
    s.upgrade_retry = a.gateway.upgrade_retry.get();
    s
}

/// The dialer from `agent.gateway.tls` and `agent.gateway.auth`.
pub fn dialer(a: &AgentConfig) -> Result<SecureDialer, AgentSetupError> {
    dialer_with(a, proxy(a)?)
}

/// The dialer, with the proxy already resolved (its credentials are read once).
fn dialer_with(
    a: &AgentConfig,
    proxy: Option<crate::proxy::Proxy>,
) -> Result<SecureDialer, AgentSetupError> {
    let g = &a.gateway;
    let connector = if g.url.starts_with("wss://") {
        let t = g.tls.clone().unwrap_or_default();
        let pkcs12_password = match &t.pkcs12_password_env {
            Some(var) => Some(std::env::var(var).map_err(|_| AgentSetupError::Env(var.clone()))?),
            None => None,
        };
        Some(tls::connector(&ClientTls {
            ca: t.ca,
            cert: t.cert,
            key: t.key,
            pkcs12: t.pkcs12,
            pkcs12_password,
            ..Default::default()
        })?)
    } else {
        None
    };
    let signer = match &g.auth {
        Some(auth) => {
            let key = auth
                .key
                .clone()
                .or_else(|| g.tls.as_ref().and_then(|t| t.key.clone()))
                .unwrap_or_default();
            Some(TokenSigner::from_pem_file(
                &key,
                &a.clinic_id,
                &g.gateway_id,
                &auth.kid,
                auth.token_lifetime.get(),
            )?)
        }
        None => None,
    };
    Ok(SecureDialer::new(connector, signer, g.connect_timeout.get()).with_proxy(proxy))
}

/// The identity files' sizes and modification times (certificate, keys).
type Stamp = Vec<Option<(u64, std::time::SystemTime)>>;

fn identity_stamp(a: &AgentConfig) -> Stamp {
    let g = &a.gateway;
    let t = g.tls.as_ref();
    [
        t.and_then(|t| t.cert.clone()),
        t.and_then(|t| t.key.clone()),
        t.and_then(|t| t.pkcs12.clone()),
        g.auth.as_ref().and_then(|a| a.key.clone()),
    ]
    .iter()
    .map(|p| {
        let m = std::fs::metadata(p.as_ref()?).ok()?;
        Some((m.len(), m.modified().ok()?))
    })
    .collect()
}

/// The agent's dialer, made again from the files when the certificate or key changes (a
/// renewal, or an operator replacing them): the next connection uses them, no restart.
pub struct ReloadingDialer {
    config: AgentConfig,
    proxy: Option<crate::proxy::Proxy>,
    current: std::sync::Mutex<(Stamp, Arc<SecureDialer>)>,
}

impl ReloadingDialer {
    pub fn new(
        a: &AgentConfig,
        proxy: Option<crate::proxy::Proxy>,
    ) -> Result<Self, AgentSetupError> {
        let dialer = Arc::new(dialer_with(a, proxy.clone())?);
        Ok(ReloadingDialer {
            config: a.clone(),
            proxy,
            current: std::sync::Mutex::new((identity_stamp(a), dialer)),
        })
    }

    fn current(&self) -> Arc<SecureDialer> {
        let stamp = identity_stamp(&self.config);
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.0 != stamp {
            // Remembered either way: a bad file is reported once, not at every attempt.
            cur.0 = stamp;
            match dialer_with(&self.config, self.proxy.clone()) {
                Ok(d) => {
                    log::info!(target: "audit", "event=identity_reloaded kid={}", d.kid().unwrap_or("-"));
                    cur.1 = Arc::new(d);
                }
                Err(e) => {
                    log::error!(target: "error", "event=identity_reload_failed error={:?} action=\"the identity in use stays\"", crate::security::log_value(&e.to_string(), 300));
                }
            }
        }
        cur.1.clone()
    }
}

impl tether_actors::ports::Dialer for ReloadingDialer {
    fn client(&self) -> awc::Client {
        self.current().client()
    }

    fn headers(&self) -> Result<Vec<(String, String)>, tether_actors::PortError> {
        self.current().headers()
    }

    fn credential_lifetime(&self) -> Option<std::time::Duration> {
        self.current().credential_lifetime()
    }
}

/// The proxy the agent tunnels through: `agent.gateway.proxy`, else the environment
/// (`HTTPS_PROXY` for wss://, `HTTP_PROXY` for ws://, minus `NO_PROXY`).
pub fn proxy(a: &AgentConfig) -> Result<Option<crate::proxy::Proxy>, AgentSetupError> {
    use crate::proxy::{from_env, Proxy};
    let Some(p) = &a.gateway.proxy else {
        return Ok(from_env(&a.gateway.url, |k| std::env::var(k).ok())?);
    };
    if p.url == "direct" {
        return Ok(None);
    }
    let proxy = Proxy::parse(&p.url, "agent.gateway.proxy.url")?;
    let password = match (&p.password_env, &p.password_file) {
        (Some(var), _) => {
            Some(std::env::var(var).map_err(|_| AgentSetupError::ProxyPasswordEnv(var.clone()))?)
        }
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| AgentSetupError::ProxyPasswordFile(file.display().to_string(), e))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        ),
        (None, None) => None,
    };
    Ok(Some(match &p.username {
        Some(user) => proxy.with_credentials(user, password.as_deref().unwrap_or_default()),
        None => proxy,
    }))
}

/// The database adapters for the agent's ports (each with its own connection), plus the dialer
/// and field encryption from config.
pub fn ports(a: &AgentConfig) -> Result<AgentPorts, AgentSetupError> {
    ports_with_proxy(a, proxy(a)?)
}

/// [`ports`] with the proxy already resolved.
pub fn ports_with_proxy(
    a: &AgentConfig,
    proxy: Option<crate::proxy::Proxy>,
) -> Result<AgentPorts, AgentSetupError> {
    // One agent per database: taken before anything reads the outbox.
    let held = instance_lock(a)?;
    let (mut source, checkpoint, sink) = db_ports(a)?;
    let mut channel_cipher: Option<Arc<dyn tether_actors::ports::PayloadCipher>> = None;
    if let Some(e) = &a.encryption {
        let keys = crate::security::crypto::data_keys(&e.keys, Some(&e.active))?;
        let fields: HashMap<String, Vec<String>> = e.fields.clone().into_iter().collect();
        channel_cipher = Some(Arc::new(ChannelCipher::new(keys.clone(), &a.clinic_id)));
        source = Arc::new(EncryptingSource::new(
            source,
            FieldCipher::new(keys, fields),
            &a.clinic_id,
        ));
    }
    Ok(AgentPorts {
        source,
        checkpoint,
        sink,
        dialer: Arc::new(ReloadingDialer::new(a, proxy)?),
        clock: Arc::new(SystemClock),
        queries: queries(a)?,
        channels: tether_actors::channels::ChannelBoard::with_cipher(channel_cipher),
        held,
    })
}

/// The database's one-agent lock (see [`crate::db::instance`]); SQL Server has none yet.
fn instance_lock(
    a: &AgentConfig,
) -> Result<Vec<Arc<dyn std::any::Any + Send + Sync>>, AgentSetupError> {
    use crate::db::instance;
    Ok(match a.database.kind.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" => vec![Arc::new(crate::db::postgres::lock_instance(
            &connection_string(a)?,
            instance::WAIT,
        )?)],
        #[cfg(not(feature = "postgres"))]
        "postgres" => Vec::new(),
        #[cfg(feature = "sqlserver")]
        "sqlserver" => vec![Arc::new(crate::db::sqlserver::lock_instance(
            &connection_string(a)?,
            a.database.ca.as_deref(),
            a.database.timeout.get(),
            instance::WAIT,
        )?)],
        #[cfg(not(feature = "sqlserver"))]
        "sqlserver" => Vec::new(),
        _ => {
            sqlite_exists(&a.database.path)?;
            vec![Arc::new(instance::lock_sqlite(
                &a.database.path,
                instance::WAIT,
            )?)]
        }
    })
}

/// A misspelt SQLite path must not become a new, empty clinic database.
fn sqlite_exists(path: &std::path::Path) -> Result<(), AgentSetupError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(AgentSetupError::NoDatabase(path.display().to_string()))
    }
}

type DbPorts = (
    Arc<dyn ChangeSource>,
    Arc<dyn tether_actors::ports::Checkpoint>,
    Arc<dyn tether_actors::ports::ChangeSink>,
);

/// The clinic database's ports alone (outbox, checkpoint, sink), on connections of their own.
pub fn db_ports(a: &AgentConfig) -> Result<DbPorts, AgentSetupError> {
    let path = &a.database.path;
    let ports: DbPorts = match a.database.kind.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" => {
            use crate::db::postgres as pg;
            let c = connection_string(a)?;
            let logical = a.database.capture == "logical";
            let source = if logical {
                pg::PgSource::open_logical(&c, &a.tables, a.database.slot_warn_mb << 20)?
            } else {
                pg::PgSource::open(&c, &a.tables)?
            };
            (
                Arc::new(source),
                Arc::new(pg::PgCheckpoint::open(&c)?),
                Arc::new(pg::PgSink::open_with(&c, &a.tables, logical)?),
            )
        }
        #[cfg(feature = "sqlserver")]
        "sqlserver" => {
            use crate::db::sqlserver as ms;
            let db = mssql(a)?;
            let ct = a.database.capture == "change_tracking";
            let mut sink = ms::MssqlSink::new(db.clone(), &a.tables);
            sink.change_tracking = ct;
            let sink = Arc::new(sink);
            let change_tracked = if ct {
                a.tables
                    .iter()
                    .filter(|t| t.direction.up())
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            (
                Arc::new(ms::MssqlSource {
                    db: db.clone(),
                    change_tracked,
                    sink_types: sink.clone(),
                }),
                Arc::new(ms::MssqlCheckpoint(db)),
                sink,
            )
        }
        #[cfg(not(feature = "postgres"))]
        "postgres" => return Err(AgentSetupError::Unsupported("postgres")),
        #[cfg(not(feature = "sqlserver"))]
        "sqlserver" => return Err(AgentSetupError::Unsupported("sqlserver")),
        _ => {
            let source = SqliteSource::open(path, &a.tables)?;
            // A column added after install is not captured: say so at every start.
            if let Ok(conn) = crate::db::sqlite::open(path) {
                for line in crate::db::sqlite::capture_drift(&conn, path, &a.tables) {
                    log::warn!(target: tether_actors::log_target::ERROR, "clinic={} event=capture_stale detail={line:?}", a.clinic_id);
                }
                // A `types:` entry naming no column changes nothing: say so.
                for t in a.tables.iter().filter(|t| !t.types.is_empty()) {
                    let cols: Vec<String> = crate::db::sqlite::columns(&conn, &t.table)
                        .map(|c| c.into_iter().map(|(n, _)| n).collect())
                        .unwrap_or_default();
                    if cols.is_empty() {
                        continue; // a missing table is refused on its own
                    }
                    for line in crate::db::values::unknown_typed_columns(t, cols.iter()) {
                        log::warn!(target: tether_actors::log_target::ERROR, "clinic={} event=config_types_unknown detail={line:?}", a.clinic_id);
                    }
                }
            }
            (
                Arc::new(source),
                Arc::new(SqliteCheckpoint::open(path)?),
                Arc::new(SqliteSink::open(path, &a.tables)?),
            )
        }
    };
    Ok(ports)
}

/// The allow-listed queries of `agent.rpc` (SQLite, PostgreSQL, SQL Server).
fn queries(a: &AgentConfig) -> Result<Arc<dyn tether_actors::ports::QueryRunner>, AgentSetupError> {
    if a.rpc.queries.is_empty() {
        return Ok(Arc::new(tether_actors::ports::NoQueries));
    }
    match a.database.kind.as_str() {
        "sqlite" => Ok(Arc::new(crate::db::sqlite::SqliteQueries::open(
            &a.database.path,
            &a.rpc,
        )?)),
        #[cfg(feature = "postgres")]
        "postgres" => Ok(Arc::new(crate::db::postgres::queries::PgQueries::open(
            &rpc_connection_string(a)?,
            &a.rpc,
        )?)),
        #[cfg(feature = "sqlserver")]
        "sqlserver" => Ok(Arc::new(crate::db::sqlserver::queries::MssqlQueries::open(
            crate::db::sqlserver::MssqlDb::connect(
                &rpc_connection_string(a)?,
                a.database.ca.as_deref(),
                a.database.timeout.get(),
            )?,
            &a.rpc,
        )?)),
        other => Err(AgentSetupError::RpcUnsupported(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_queries_may_run_on_a_read_replica_with_read_only_intent() {
        let mut a = AgentConfig::default();
        a.database.kind = "sqlserver".into();
        a.database.connection = "Server=tcp:primary,1433;Database=clinic".into();
        assert_eq!(
            rpc_connection_string(&a).expect("own"),
            "Server=tcp:primary,1433;Database=clinic",
            "without a replica: the database's own connection, unchanged"
        );
        a.rpc.connection = Some("Server=tcp:ag-listener,1433;Database=clinic;".into());
        assert_eq!(
            rpc_connection_string(&a).expect("replica"),
            "Server=tcp:ag-listener,1433;Database=clinic;ApplicationIntent=ReadOnly"
        );
        // Set by the operator: kept as written.
        a.rpc.connection = Some("Server=r;applicationintent=ReadWrite".into());
        assert_eq!(
            rpc_connection_string(&a).expect("as written"),
            "Server=r;applicationintent=ReadWrite"
        );
        // The password variable applies to the replica too (any set variable will do here);
        // PostgreSQL gets no intent.
        a.database.password_env = Some("PATH".into());
        a.rpc.connection = Some("Server=r".into());
        let with_pw = rpc_connection_string(&a).expect("with password");
        assert!(
            with_pw.starts_with("Server=r;password={")
                && with_pw.ends_with("};ApplicationIntent=ReadOnly"),
            "{with_pw}"
        );
        a.database.kind = "postgres".into();
        a.rpc.connection = Some("host=replica dbname=clinic".into());
        let pg = rpc_connection_string(&a).expect("pg");
        assert!(
            pg.starts_with("host=replica dbname=clinic password='"),
            "{pg}"
        );
        assert!(
            !pg.to_ascii_lowercase().contains("applicationintent"),
            "{pg}"
        );
    }

    #[test]
    fn install_against_a_misspelt_sqlite_path_creates_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("clinc.db");
        let mut a = AgentConfig::default();
        a.database.path = path.clone();
        a.tables = vec![crate::config::TableConfig::new(
            "patients",
            "patient",
            &["id"],
            crate::config::Direction::Both,
        )];
        let err = install(&a).expect_err("no database");
        assert!(err.to_string().contains("clinc.db: no such file"), "{err}");
        assert!(!path.exists(), "an empty database file was created");
        assert!(uninstall(&a).is_err());
        assert!(instance_lock(&a).is_err());
        assert!(!path.exists());
    }
}

//! Agent wiring: config → settings + adapters → the supervised actors.

use std::collections::HashMap;
use std::sync::Arc;

use tether_actors::agent::{AgentPorts, AgentSettings};
use tether_actors::ports::ChangeSource;
use tether_actors::supervisor::RestartPolicy;
use tether_actors::SystemClock;

use crate::config::AgentConfig;
use crate::db::sqlite::{SqliteCheckpoint, SqliteSink, SqliteSource};
use crate::security::crypto::{EncryptingSource, FieldCipher};
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
    s
}

/// The dialer from `agent.gateway.tls` and `agent.gateway.auth`.
pub fn dialer(a: &AgentConfig) -> Result<SecureDialer, AgentSetupError> {
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
    Ok(SecureDialer::new(
        connector,
        signer,
        g.connect_timeout.get(),
    ))
}

/// SQLite adapters for the agent's ports (each with its own connection), plus the dialer and
/// field encryption from config.
pub fn sqlite_ports(a: &AgentConfig) -> Result<AgentPorts, AgentSetupError> {
    let path = &a.database.path;
    let mut source: Arc<dyn ChangeSource> = Arc::new(SqliteSource::open(path)?);
    if let Some(e) = &a.encryption {
        let keys = crate::gateway::data_keys(&e.keys, Some(&e.active))?;
        let fields: HashMap<String, Vec<String>> = e.fields.clone().into_iter().collect();
        source = Arc::new(EncryptingSource::new(
            source,
            FieldCipher::new(keys, fields),
            &a.clinic_id,
        ));
    }
    Ok(AgentPorts {
        source,
        checkpoint: Arc::new(SqliteCheckpoint::open(path)?),
        sink: Arc::new(SqliteSink::open(path, &a.tables)?),
        dialer: Arc::new(dialer(a)?),
        clock: Arc::new(SystemClock),
    })
}

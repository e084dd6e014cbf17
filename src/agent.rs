//! Agent wiring: config → settings + adapters → the supervised actors.

use std::sync::Arc;

use tether_actors::agent::{AgentPorts, AgentSettings};
use tether_actors::ports::PlainDialer;
use tether_actors::supervisor::RestartPolicy;
use tether_actors::SystemClock;

use crate::config::AgentConfig;
use crate::db::sqlite::{SqliteCheckpoint, SqliteError, SqliteSink, SqliteSource};

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

/// SQLite adapters for the agent's ports (each with its own connection).
pub fn sqlite_ports(a: &AgentConfig) -> Result<AgentPorts, SqliteError> {
    let path = &a.database.path;
    Ok(AgentPorts {
        source: Arc::new(SqliteSource::open(path)?),
        checkpoint: Arc::new(SqliteCheckpoint::open(path)?),
        sink: Arc::new(SqliteSink::open(path, &a.tables)?),
        dialer: Arc::new(PlainDialer),
        clock: Arc::new(SystemClock),
    })
}

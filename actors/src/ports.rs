//! Ports: what the runtime needs from the outside world. Adapters live in `src/`.
//!
//! All database ports are synchronous and are called from a blocking thread pool, never on an
//! actix arbiter thread.

use std::time::{Instant, SystemTime};

use tether_schemas::{Event, Update, UpdateStatus};

/// An error from an adapter. The message names what failed, never row data.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PortError(pub String);

impl PortError {
    pub fn new(msg: impl Into<String>) -> Self {
        PortError(msg.into())
    }
}

/// Reads committed changes from the clinic database's outbox, in commit order.
pub trait ChangeSource: Send + Sync + 'static {
    /// A cheap value that changes whenever new outbox rows may have been committed.
    fn change_token(&self) -> Result<u64, PortError>;
    /// Up to `limit` events with `seq > after`, in increasing `seq` (= commit) order.
    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, PortError>;
    /// How many events wait after `after`, and when the oldest was committed. The default
    /// counts by reading (at most [`BACKLOG_READ_CAP`]); adapters answer with one query.
    fn backlog(&self, after: u64) -> Result<Backlog, PortError> {
        let events = self.read_after(after, BACKLOG_READ_CAP)?;
        Ok(Backlog {
            events: events.len() as u64,
            at_least: events.len() >= BACKLOG_READ_CAP,
            oldest_committed_at: events.first().map(|e| e.committed_at.clone()),
            capture_retained_bytes: None,
        })
    }
}

/// The most events [`ChangeSource::backlog`]'s default reads to count.
pub const BACKLOG_READ_CAP: usize = 10_000;

/// Events not yet acknowledged (admin endpoint, `tether agent status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backlog {
    pub events: u64,
    /// `events` is a lower bound (the count stopped at a cap).
    pub at_least: bool,
    /// RFC 3339 commit time of the oldest waiting event.
    pub oldest_committed_at: Option<String>,
    /// Logical capture: the WAL bytes the database server keeps for the capture slot.
    pub capture_retained_bytes: Option<u64>,
}

/// The durable record of what the gateway has acknowledged.
pub trait Checkpoint: Send + Sync + 'static {
    fn load(&self) -> Result<u64, PortError>;
    /// Stores `acked` if it is higher than the stored value (concurrent saves never move it back).
    fn save(&self, acked: u64) -> Result<(), PortError>;
    /// Deletes acknowledged outbox rows (`seq <= acked`) older than the retention; returns how many.
    fn purge(&self, acked: u64, retention: std::time::Duration) -> Result<usize, PortError>;
    /// The outbox's identity, made at install; a re-created outbox has a new one (0: unknown).
    fn source_id(&self) -> Result<u64, PortError> {
        Ok(0)
    }
}

/// The result of applying one cloud update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub status: UpdateStatus,
    pub reason: Option<String>,
    /// True when the inbox already held this update (a redelivery): nothing was changed.
    pub duplicate: bool,
}

/// Applies cloud updates to the clinic database: atomically with the inbox record, without
/// the write being captured as a clinic event.
pub trait ChangeSink: Send + Sync + 'static {
    fn apply(&self, update: &Update) -> Result<ApplyOutcome, PortError>;
}

/// Time, so that time-dependent logic can be tested without sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
    fn wall(&self) -> SystemTime;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// How the connection actor reaches the gateway: the HTTP client (TLS lives here) and the
/// credentials for each attempt. The security layer provides a real one.
pub trait Dialer: Send + Sync + 'static {
    fn client(&self) -> awc::Client;
    /// Extra headers for the upgrade request of one connection attempt (e.g. `Authorization`).
    fn headers(&self) -> Result<Vec<(String, String)>, PortError>;
    /// How long the credentials of one attempt stay valid; the connection re-authenticates
    /// (reconnects with fresh credentials) before that runs out.
    fn credential_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// A plain `ws://` dialer with no credentials.
#[derive(Debug, Default)]
pub struct PlainDialer;

impl Dialer for PlainDialer {
    fn client(&self) -> awc::Client {
        awc::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .finish()
    }
    fn headers(&self) -> Result<Vec<(String, String)>, PortError> {
        Ok(Vec::new())
    }
}

/// Rows of one allow-listed query (`rpc_request`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryRows {
    pub rows: Vec<tether_schemas::Row>,
    /// More rows matched than the query's limit.
    pub truncated: bool,
}

/// Why a named query was not answered. `field` names the input at fault (`name`,
/// `params.<p>`), for the caller's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QueryError {
    pub field: Option<String>,
    pub message: String,
}

/// Runs the agent's allow-listed, named, parameterised queries against the clinic database
/// (for `POST /v1/clinics/{id}/rpc`). Read-only by contract; adapters enforce it.
pub trait QueryRunner: Send + Sync + 'static {
    fn run(&self, name: &str, params: &tether_schemas::Row) -> Result<QueryRows, QueryError>;
}

/// No queries configured: every request is answered "unknown query".
#[derive(Debug, Default)]
pub struct NoQueries;

impl QueryRunner for NoQueries {
    fn run(&self, name: &str, _: &tether_schemas::Row) -> Result<QueryRows, QueryError> {
        Err(QueryError {
            field: Some("name".into()),
            message: format!("no query `{name}` is configured on this agent (agent.rpc.queries)"),
        })
    }
}

/// Why a channel payload's fields could not be encrypted or decrypted: the field at fault (if
/// the failure is about one) and why, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SealError {
    pub field: Option<String>,
    pub message: String,
}

/// Field encryption of channel payloads (the channels that list fields in `encrypt`), with this
/// clinic's data keys. The ciphertext is bound to the clinic, the channel and the message id.
pub trait PayloadCipher: Send + Sync + 'static {
    /// Encrypts `fields` of an up message's payload in place (absent and null ones are left).
    fn seal(
        &self,
        channel: &str,
        message_id: &str,
        payload: &mut tether_schemas::Row,
        fields: &[String],
    ) -> Result<(), SealError>;
    /// Decrypts `fields` of a down message's payload in place; a listed field that is not a
    /// ciphertext, or does not decrypt, is refused. On error the payload is left untouched.
    fn open(
        &self,
        channel: &str,
        message_id: &str,
        payload: &mut tether_schemas::Row,
        fields: &[String],
    ) -> Result<(), SealError>;
}

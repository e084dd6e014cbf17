//! The gateway's storage port: what the sessions, the REST API and the webhook dispatchers need
//! from a durable store, with typed outcomes and errors. Adapters (SQLite, PostgreSQL) live in
//! `src/gateway/store/`; every adapter passes the same contract suite (`tests/store_contract.rs`).
//!
//! Rules every adapter keeps:
//! - `append` resolves only after the batch is committed (acknowledge only what is durable).
//! - Per clinic, `acked_seq` is the highest sequence up to which every event is stored; a batch
//!   whose `prev_seq` is above it is a [`AppendOutcome::Gap`]; events are unique on
//!   `(clinic, source, seq)`, so a resent event is acknowledged again without a second row.
//! - Event ids are visible in id order: a reader paging with `after = last id seen` never skips
//!   an event that commits later with a smaller id.
//! - Per-clinic counters (`events`, `pending_updates`, `last_event_at`) are kept in the same
//!   transaction as the write that changes them: fleet views cost O(clinics), not O(events).
//! - One owner per clinic, fenced: every `hello` claims the clinic with a new, higher epoch and
//!   records the node that holds it; an `append` carrying an epoch that is no longer the
//!   clinic's is [`AppendOutcome::Fenced`] and writes nothing (checked in the append's own
//!   transaction, under the clinic row's lock, so a claim and an append never interleave).
//! - Writes queue in a bounded queue; when it is full, the call fails at once with
//!   [`StoreError::Unavailable`] `{ retryable: true }` (the session acks nothing of the batch and
//!   closes 1013, Try Again Later).

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use serde_json::{Map, Value};
use tether_schemas::{Event, RawEvent, Update, UpdateOp, UpdateStatus};

/// See [`GatewayStore::watch`].
pub type SignalWatcher = Box<dyn Fn(Signal) -> bool + Send + 'static>;

/// What one node signals to the others through the store (PostgreSQL: `NOTIFY`, sent when the
/// transaction that wrote the matching row commits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// An update for this clinic has been committed (by any node).
    Updates(String),
    /// A call for a clinic this node holds has been forwarded to it: take it ([`GatewayStore::take_call`]).
    Call(String),
    /// A call this node forwarded has been answered: fetch it ([`GatewayStore::call_answer`]).
    Answer(String),
    /// The clinic registry kept in the store changed (to this version): load it again.
    Registry(u64),
    /// A clinic published up-channel messages (on any node): streams read what is new.
    UpChannel,
}

/// A REST call (`POST /v1/clinics/{id}/rpc`) forwarded by the node that received it to the
/// node that holds the clinic's session. Parameters never reach a log.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardedCall {
    /// The request id the clinic sees (`rpc_…`), unique per call.
    pub id: String,
    pub clinic_id: String,
    /// The node that received the call and waits for the answer.
    pub from_node: String,
    /// The node that held the clinic when the call was forwarded.
    pub to_node: String,
    pub name: String,
    pub params: Map<String, Value>,
    /// When the caller stops waiting (milliseconds since the Unix epoch).
    pub deadline_ms: u64,
}

/// What a store call resolves to.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened or migrated (names the store and the reason).
    #[error("store {store}: {message}")]
    Open { store: String, message: String },
    /// The store's schema is newer than this binary knows.
    #[error("store {store}: schema version {found} is newer than this binary's {supported}; upgrade tether (or point it at another store)")]
    TooNew {
        store: String,
        found: i64,
        supported: i64,
    },
    /// The store cannot take the call now (writer queue full, connection lost, disk full).
    /// `retryable`: the same call may succeed later without anyone's help.
    #[error("store unavailable ({}): {message}", if *retryable { "retryable" } else { "needs attention" })]
    Unavailable { retryable: bool, message: String },
    /// The request contradicts what the store holds (an `Idempotency-Key` reused for another
    /// body).
    #[error("{0}")]
    Conflict(String),
    /// `GET /v1/events?after=` points before the retained history.
    #[error(
        "events up to {pruned_through} were removed by retention; the oldest kept is {oldest}"
    )]
    Gone { pruned_through: u64, oldest: u64 },
    /// The writer has stopped (the gateway is shutting down).
    #[error("store writer has stopped")]
    Stopped,
    /// `hello` from another database (source) than the one the clinic syncs from, with no
    /// re-install confirmed by an operator: nothing was changed.
    #[error("clinic {clinic} syncs from source {known}; source {offered} is refused until an operator confirms a re-install (POST /v1/clinics/{clinic}/source-reset)")]
    SourceConflict {
        clinic: String,
        known: u64,
        offered: u64,
    },
}

impl StoreError {
    pub fn busy(what: &str) -> StoreError {
        StoreError::Unavailable {
            retryable: true,
            message: format!("{what}: writer queue full"),
        }
    }
}

/// One event with the problem found in it, if any (stored flagged, never dropped). The key and
/// the row are the JSON text received from the agent: adapters bind them as they are.
#[derive(Debug, Clone)]
pub struct IncomingEvent {
    pub event: RawEvent,
    pub problem: Option<String>,
}

impl IncomingEvent {
    /// An event built in code (tools, tests), encoded once.
    pub fn from_event(event: &Event, problem: Option<String>) -> IncomingEvent {
        IncomingEvent {
            event: RawEvent::from_event(event),
            problem,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored (or already held); everything up to `acked` is durable.
    Stored { acked: u64, inserted: usize },
    /// `prev_seq` is above what the store holds, or the batch comes from an outbox that is no
    /// longer the clinic's current one: nothing stored.
    Gap { acked: u64 },
    /// Another session (on this node or another) has claimed the clinic since this one's
    /// `hello`: nothing stored; the session must close. `epoch` is the current claim's.
    Fenced { epoch: u64 },
}

/// What `hello` answers: where to resume, and the claim the session's appends carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Everything up to this sequence is durable.
    pub acked: u64,
    /// This session's claim on the clinic; higher than every earlier one.
    pub epoch: u64,
}

/// No claim check: for tools and tests that write without a session (never a gateway session).
pub const UNFENCED: u64 = 0;

/// A gateway node as it last reported itself (`gateway_nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRecord {
    pub node_id: String,
    /// Where its API listens, as the node sees it.
    pub addr: String,
    pub started_at: String,
    /// Its last heartbeat, milliseconds since the Unix epoch (on its own clock).
    pub last_beat_ms: u64,
    /// Sessions it held at that heartbeat.
    pub sessions: u64,
}

/// A cloud → clinic update as posted to the REST API.
#[derive(Debug, Clone)]
pub struct NewUpdate {
    pub clinic_id: String,
    pub entity: String,
    pub op: UpdateOp,
    pub key: Map<String, Value>,
    pub row: Option<Map<String, Value>>,
    /// The caller's `Idempotency-Key`: a second enqueue with the same key for the same clinic
    /// answers the first update's id (same body) or [`StoreError::Conflict`] (another body).
    pub idempotency_key: Option<String>,
    /// The fan-out (`POST /v1/updates`) this update belongs to.
    pub batch_id: Option<String>,
}

/// A channel message: queued for a clinic (down, from the REST API) or received from one (up,
/// from its agent). The payload is JSON text, already checked against the channel's schema;
/// it never reaches a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewChannelMessage {
    /// Down: made by the gateway (`msg_…`); up: the agent's. Unique per clinic.
    pub message_id: String,
    pub clinic_id: String,
    pub channel: String,
    /// `true`: from the clinic (up); `false`: for the clinic (down).
    pub up: bool,
    pub durable: bool,
    pub payload: String,
    /// Transient messages: when they expire (Unix ms); durable: `None`.
    pub expires_ms: Option<u64>,
    /// The fan-out this message belongs to (`POST /v1/channels/{name}`).
    pub batch_id: Option<String>,
}

/// A channel message as the store holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChannelRecord {
    /// Its position in the store (streams resume after it).
    #[serde(skip)]
    pub row: i64,
    pub message_id: String,
    pub clinic_id: String,
    pub channel: String,
    /// `down` or `up`.
    pub direction: String,
    /// `transient` or `durable`.
    pub delivery: String,
    /// Down: `pending` (not sent yet), `sent` (handed to the clinic's session, not confirmed),
    /// `delivered` (a subscriber at the clinic has it), `expired`; up: `accepted`.
    pub status: String,
    /// Times it was handed to a session (down).
    pub deliveries: u64,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// The payload (JSON text), when the read asked for it.
    #[serde(skip)]
    pub payload: Option<String>,
    /// `created_at` and `expires_at` in Unix ms.
    #[serde(skip)]
    pub created_ms: u64,
    #[serde(skip)]
    pub expires_ms: Option<u64>,
}

/// What `DELETE /v1/updates/{id}` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It had not been handed to a session: it never will be.
    Cancelled,
    NotFound,
    /// Too late: its status (delivered, applied, failed, conflict, cancelled).
    NotPending(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClinicRecord {
    pub clinic_id: String,
    pub acked_seq: u64,
    pub first_seen: String,
    pub last_event_at: Option<String>,
    /// Events held in the store now (retention removes old ones).
    pub events: u64,
    /// Updates pending or delivered, not yet answered.
    pub pending_updates: u64,
    /// The node whose session claimed the clinic last (kept after the session ends: see
    /// `GatewayStore::nodes` for whether that node is alive).
    pub node: Option<String>,
    /// The last claim's epoch (0: never claimed).
    pub epoch: u64,
    /// Cloud updates the clinic answered `failed` (all time).
    pub failed_updates: u64,
    /// Events stored with a schema problem (all time: retention does not lower it).
    pub flagged_events: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    pub id: u64,
    pub clinic_id: String,
    pub seq: u64,
    pub entity: String,
    pub op: String,
    pub key: Value,
    pub row: Option<Value>,
    pub committed_at: String,
    pub received_at: String,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateRecord {
    pub update_id: String,
    pub clinic_id: String,
    pub entity: String,
    pub op: String,
    pub status: String,
    pub reason: Option<String>,
    pub deliveries: u64,
    pub created_at: String,
    pub updated_at: String,
}

/// A webhook delivery that gave up, waiting for a replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub id: u64,
    pub event_id: u64,
    pub attempts: u32,
    pub last_error: String,
    pub failed_at: String,
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    /// The highest event id removed so far (0: none ever).
    pub pruned_through: u64,
}

/// A one-time enrolment code as the store keeps it: never the code itself, its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEnrolmentCode {
    /// Lowercase hex SHA-256 of the normalised code.
    pub code_hash: String,
    /// The clinic the code enrols, and nothing else.
    pub clinic_id: String,
    /// Registry labels the enrolled clinic gets (a JSON object).
    pub labels_json: String,
    /// Unix seconds after which the code is refused.
    pub expires_at: u64,
    /// The admin token's name that issued it (audit).
    pub created_by: String,
}

/// An enrolment code as listed (never the code: its hash's first 8 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CodeRecord {
    pub hash_prefix: String,
    pub created_at: String,
    pub created_by: String,
    /// RFC 3339.
    pub expires_at: String,
    pub used_at: Option<String>,
    pub used_by: Option<String>,
}

/// What taking an enrolment code found. Only `Taken` consumes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeTake {
    /// The code was valid: it is now used (by this call, on whichever node).
    Taken {
        clinic_id: String,
        labels_json: String,
    },
    /// No such code (mistyped, or purged long after it expired).
    Unknown,
    /// Used before, at this time (RFC 3339), by this peer.
    Used { at: String, by: String },
    /// Past its expiry.
    Expired { clinic_id: String },
}

/// The gateway's storage port. Every method is cheap to call from an actix thread: reads run
/// on the adapter's blocking pool, writes on its group-committing writer.
pub trait GatewayStore: std::any::Any + Send + Sync + 'static {
    /// `sqlite` or `postgres` (for logs and metrics).
    fn kind(&self) -> &'static str;

    /// This store's node id (recorded as the owner of the clinics its sessions claim).
    fn node(&self) -> &str;

    /// Registers a session's outbox, claims the clinic for this node with a new epoch, and
    /// returns the position to resume from. A different, non-zero `source` than the one on
    /// record is another database presenting the clinic's identity: refused
    /// ([`StoreError::SourceConflict`]) unless an operator confirmed a re-install
    /// ([`GatewayStore::allow_source_reset`]); then the position restarts at 0 for the new
    /// source (the old events stay) and the confirmation is used up.
    fn hello(&self, clinic: &str, source: u64) -> StoreFuture<Claim>;

    /// An operator confirms that the clinic's database was re-installed: its next `hello` from
    /// a new source is taken (once). `false`: the store does not know the clinic.
    fn allow_source_reset(&self, clinic: &str) -> StoreFuture<bool>;

    /// Queues a batch for the next group commit; resolves once it is durable (or refused).
    /// Batches are committed in the order this is called. `epoch` is the session's claim
    /// ([`UNFENCED`] skips the check): a claim that has moved on is [`AppendOutcome::Fenced`].
    fn append(
        &self,
        clinic: &str,
        source: u64,
        epoch: u64,
        prev_seq: u64,
        events: Vec<IncomingEvent>,
    ) -> StoreFuture<AppendOutcome>;

    /// The session with claim `epoch` has ended: the clinic is held by no node (unless a newer
    /// claim has taken it since, which this leaves alone).
    fn release(&self, clinic: &str, epoch: u64) -> StoreFuture<()>;

    /// Calls `on_signal` with every [`Signal`] meant for this node (updates committed by any
    /// node; calls forwarded to this node; answers to calls it forwarded), from a thread of the
    /// adapter's, until it returns `false`. Answers whether the adapter signals across processes
    /// (PostgreSQL: LISTEN/NOTIFY); `false` when there is only this process to hear (SQLite),
    /// and `on_signal` is dropped.
    fn watch(&self, on_signal: SignalWatcher) -> bool;

    /// Hands a call to `call.to_node` (a row, and [`Signal::Call`] to that node on commit).
    /// Calls whose deadline passed more than a minute ago are removed as it goes.
    fn forward_call(&self, call: ForwardedCall) -> StoreFuture<()>;

    /// The forwarded call `id`, if it is for this node and nobody has taken it yet (a call is
    /// taken once).
    fn take_call(&self, id: &str) -> StoreFuture<Option<ForwardedCall>>;

    /// Records the answer to a taken call (JSON text) and signals [`Signal::Answer`] to the
    /// node that forwarded it. `false` if the call is gone (its caller gave up).
    fn answer_call(&self, id: &str, answer: &str) -> StoreFuture<bool>;

    /// The answer to call `id` once there is one; the call's row is removed with it.
    fn call_answer(&self, id: &str) -> StoreFuture<Option<String>>;

    /// The caller stopped waiting: the call is removed, answered or not.
    fn drop_call(&self, id: &str) -> StoreFuture<()>;

    /// The key the nodes on this store share to authenticate the requests they pass to each
    /// other (hex): `candidate` becomes it if there is none yet, so every node gets the same.
    fn cluster_key(&self, candidate: &str) -> StoreFuture<String>;

    /// Whether this node leads `role` (e.g. one webhook endpoint's dispatcher): taken when no
    /// live node holds it, kept while this node's store connection lives, released when that
    /// connection ends (the node died, or stayed silent past the server's idle limit) so that
    /// another node takes over. One process per store (SQLite): always `true`.
    fn try_lead(&self, role: &str) -> StoreFuture<bool>;

    /// Records this node's heartbeat (upsert of its `gateway_nodes` row).
    fn node_beat(&self, addr: &str, started_at: &str, sessions: u64) -> StoreFuture<()>;

    /// Every node that has ever beaten on this store, ordered by id.
    fn nodes(&self) -> StoreFuture<Vec<NodeRecord>>;

    fn acked_seq(&self, clinic: &str) -> StoreFuture<u64>;

    /// Every clinic, ordered by id, from the counters (O(clinics)).
    fn clinics(&self) -> StoreFuture<Vec<ClinicRecord>>;
    fn clinic(&self, clinic: &str) -> StoreFuture<Option<ClinicRecord>>;

    /// Events after id `after` in id order (of one clinic, or all). `Gone` when `after` lies
    /// before what retention kept.
    fn events_page(
        &self,
        clinic: Option<&str>,
        after: u64,
        limit: usize,
    ) -> StoreFuture<Vec<StoredEvent>>;

    /// Like [`GatewayStore::events_page`], only events stored with a `problem` (a row that
    /// failed its entity's schema, or a frame the gateway could not fully check); a partial
    /// index keeps this cheap however rare they are.
    fn flagged_events_page(
        &self,
        clinic: Option<&str>,
        after: u64,
        limit: usize,
    ) -> StoreFuture<Vec<StoredEvent>>;

    /// Flagged events stored with an id above `after_id`: their count and the highest id
    /// (`/metrics` keeps a running total from it; O(new flagged events)).
    fn flagged_since(&self, after_id: u64) -> StoreFuture<(u64, u64)>;

    /// The clinic's events from its current outbox (`source`), in storage (id) order, after id
    /// `after_id` (the history checker compares them with what the clinic committed).
    fn clinic_events(
        &self,
        clinic: &str,
        after_id: u64,
        limit: usize,
    ) -> StoreFuture<Vec<StoredEvent>>;

    /// The newest event id (0 when empty).
    fn head(&self) -> StoreFuture<u64>;

    fn enqueue_update(&self, update: NewUpdate) -> StoreFuture<String>;
    /// Queues one update per clinic in one transaction (all or none); ids in the given order.
    fn enqueue_batch(&self, updates: Vec<NewUpdate>) -> StoreFuture<Vec<String>>;
    /// How many of a batch's updates are in each status (empty: no such batch).
    fn batch_counts(&self, batch_id: &str) -> StoreFuture<Vec<(String, u64)>>;
    /// Open updates (pending or delivered) of a clinic after row `after_row`, oldest first.
    fn open_updates(
        &self,
        clinic: &str,
        after_row: i64,
        limit: usize,
    ) -> StoreFuture<Vec<(i64, Update)>>;
    /// Marks updates handed to a session and answers those still open (pending or delivered),
    /// in the order given: a session sends only these, so a cancelled update is never sent.
    fn mark_delivered(&self, ids: Vec<String>) -> StoreFuture<Vec<String>>;
    /// Cancels an update no session has been handed yet.
    fn cancel_update(&self, update_id: &str) -> StoreFuture<CancelOutcome>;
    /// A clinic's updates after row `after_row`, oldest first, of one status or all.
    fn updates_page(
        &self,
        clinic: &str,
        status: Option<String>,
        after_row: i64,
        limit: usize,
    ) -> StoreFuture<Vec<(i64, UpdateRecord)>>;
    /// Records an agent's answer; false if the update is not this clinic's or not open.
    fn update_result(
        &self,
        clinic: &str,
        update_id: &str,
        status: UpdateStatus,
        reason: Option<String>,
    ) -> StoreFuture<bool>;
    fn update(&self, update_id: &str) -> StoreFuture<Option<UpdateRecord>>;

    /// Keeps channel messages in one transaction (all or none); answers, in order, whether each
    /// was new (`false`: this clinic already sent a message with this id — a resend). Down
    /// messages signal the node holding their clinic's session ([`Signal::Updates`]); up ones
    /// every node ([`Signal::UpChannel`]).
    fn enqueue_channel(&self, messages: Vec<NewChannelMessage>) -> StoreFuture<Vec<bool>>;
    /// A clinic's down messages still to deliver (`pending` or `sent`, not expired at
    /// `now_ms`) after row `after_row`, oldest first, with their payloads.
    fn open_channel(
        &self,
        clinic: &str,
        after_row: i64,
        now_ms: u64,
        limit: usize,
    ) -> StoreFuture<Vec<ChannelRecord>>;
    /// Marks down messages handed to a session; answers those still open, in the order given.
    fn mark_channel_sent(&self, ids: Vec<String>) -> StoreFuture<Vec<String>>;
    /// Records what the clinic's agent did with a down message (`delivered` or `expired`);
    /// answers its channel and when it was published (Unix ms), or `None` if it is not this
    /// clinic's or no longer open (an answer counts once, whichever session brings it).
    fn channel_result(
        &self,
        clinic: &str,
        message_id: &str,
        status: &str,
    ) -> StoreFuture<Option<(String, u64)>>;
    /// One message (without its payload), down or up; an up message's id is its clinic's, so
    /// `clinic` narrows it (down ids are unique anyway).
    fn channel_message(
        &self,
        message_id: &str,
        clinic: Option<&str>,
    ) -> StoreFuture<Option<ChannelRecord>>;
    /// Marks open transient down messages whose time ran out by `now_ms` as `expired` (answers
    /// how many, per channel: each is counted once, on whichever node expired it) and removes
    /// finished messages created before `purge_before_ms`.
    fn expire_channels(&self, now_ms: u64, purge_before_ms: u64)
        -> StoreFuture<Vec<(String, u64)>>;
    /// Clinics with down messages pending (the sweep nudges their sessions).
    fn channel_pending_clinics(&self) -> StoreFuture<Vec<String>>;
    /// Up messages after row `after_row`, oldest first, with their payloads (the stream for
    /// the main Web API).
    fn up_channel_page(&self, after_row: i64, limit: usize) -> StoreFuture<Vec<ChannelRecord>>;

    fn webhook_cursor(&self, name: &str) -> StoreFuture<u64>;
    /// Moves the cursor from `from` to `to`; `false` if it is no longer at `from` (a replay).
    fn advance_webhook_cursor(&self, name: &str, from: u64, to: u64) -> StoreFuture<bool>;
    /// Re-delivery from `event_id` on; refused (`Ok(false)`) past the newest event, in the same
    /// write that moves the cursor (no race with events stored meanwhile).
    fn replay_webhook(&self, name: &str, event_id: u64) -> StoreFuture<Result<(), u64>>;
    fn add_dead_letter(
        &self,
        name: &str,
        event_id: u64,
        attempts: u32,
        error: &str,
    ) -> StoreFuture<()>;
    fn dead_letters(&self, name: &str, after: u64, limit: usize) -> StoreFuture<Vec<DeadLetter>>;
    fn dead_letter_count(&self, name: &str) -> StoreFuture<u64>;
    /// The event id of dead letter `id`, if it exists.
    fn dead_letter_event(&self, name: &str, id: u64) -> StoreFuture<Option<u64>>;
    fn remove_dead_letter(&self, name: &str, id: u64) -> StoreFuture<bool>;

    /// Removes up to `batch` of the oldest events received before `cutoff` (RFC 3339) and with
    /// an id below `below_id` (events every webhook has delivered), counters included.
    fn prune(&self, cutoff: &str, below_id: u64, batch: usize) -> StoreFuture<Pruned>;

    /// The replay guard for connection-token ids, shared by every gateway node on the store:
    /// `true` the first time `jti` is seen (kept until `expires_at`, unix seconds, has passed),
    /// `false` on a replay. Expired ids are purged as it goes.
    fn remember_token(&self, jti: &str, expires_at: u64) -> StoreFuture<bool>;

    /// The clinic registry kept in the store (`gateway.auth.registry: store`): its version
    /// (bumped by every change) and every entry as `(clinic id, entry JSON)`, read together.
    fn registry_entries(&self) -> StoreFuture<(u64, Vec<(String, String)>)>;
    /// The registry's version alone (a cheap poll).
    fn registry_version(&self) -> StoreFuture<u64>;
    /// Adds or replaces a clinic's entry; answers the registry's new version. Every node is
    /// signalled ([`Signal::Registry`]) when it commits.
    fn put_registry_entry(&self, clinic: &str, entry_json: &str) -> StoreFuture<u64>;
    /// Removes a clinic's entry: `Some(new version)`, or `None` when it had none.
    fn delete_registry_entry(&self, clinic: &str) -> StoreFuture<Option<u64>>;

    /// Keeps a new enrolment code (and purges codes expired more than a week ago).
    fn add_enrolment_code(&self, code: NewEnrolmentCode) -> StoreFuture<()>;
    /// Takes a code once, across every node on the store: the first caller gets `Taken` and
    /// the code is used (`by` is recorded: the caller's address); every later call `Used`.
    fn take_enrolment_code(&self, code_hash: &str, by: &str) -> StoreFuture<CodeTake>;
    /// A clinic's codes (used or not, expired or not, until purged), newest first.
    fn enrolment_codes(&self, clinic: &str) -> StoreFuture<Vec<CodeRecord>>;
    /// Withdraws a clinic's unused codes; answers how many.
    fn withdraw_enrolment_codes(&self, clinic: &str) -> StoreFuture<u64>;
    /// Gives a taken code back (the enrolment failed after taking it, on the gateway's side).
    fn return_enrolment_code(&self, code_hash: &str) -> StoreFuture<()>;

    /// One round trip through the writer: resolves once a (trivial) write has committed.
    fn check_writer(&self) -> StoreFuture<()>;

    /// Stops the writer after what is queued (idempotent).
    fn close(&self);
}

//! The gateway's store adapters behind the storage port (`tether_actors::gateway_store`):
//! SQLite (embedded default, `sqlite.rs`) and PostgreSQL (production, `postgres.rs`).
//!
//! Both share the machinery here: a group-committing writer on its own thread, fed by a
//! bounded queue (a full queue answers `Unavailable { retryable: true }` at once instead of
//! growing), and a pool of read connections used from tokio's blocking threads, so no database
//! call runs on an actix arbiter thread.

#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

pub use tether_actors::gateway_store::{
    AppendOutcome, CancelOutcome, ChannelRecord, Claim, ClinicRecord, CodeRecord, CodeTake,
    DeadLetter, ForwardedCall, GatewayStore, IncomingEvent, NewChannelMessage, NewEnrolmentCode,
    NewUpdate, NodeRecord, Pruned, Signal, SignalWatcher, StoreError, StoreFuture, StoredEvent,
    UpdateRecord, UNFENCED,
};
pub use tether_schemas::iso_from_millis;

/// The store as the rest of the gateway holds it.
pub type Store = dyn GatewayStore;

/// Writes waiting for the writer, at most (each an append batch or one small write).
pub const DEFAULT_QUEUE: usize = 4096;
/// Bytes of events waiting for their commit, across every session, at most: past it an append
/// is refused at once as retryable (the session acknowledges nothing of it and closes 1013; the
/// agent resends after its backoff). Each waiting event costs about its wire size (key and row
/// are kept as the JSON text received) plus ~100 bytes.
pub const DEFAULT_QUEUE_BYTES: usize = 64 << 20;

/// Which adapter, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    /// A PostgreSQL connection string and the schema the tables live in.
    Postgres {
        url: String,
        schema: String,
    },
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreLocation::Postgres { url, schema } => {
                write!(f, "postgres:{} schema={schema}", redact_url(url))
            }
        }
    }
}

/// A connection string without its password (for logs and errors).
pub fn redact_url(url: &str) -> String {
    let mut out = Vec::new();
    for part in url.split(' ') {
        if part.starts_with("password=") {
            out.push("password=***".to_string());
        } else {
            out.push(part.to_string());
        }
    }
    let s = out.join(" ");
    // postgres://user:secret@host/db
    if let Some(scheme_end) = s.find("://") {
        if let Some(at) = s[scheme_end + 3..].find('@') {
            let creds = &s[scheme_end + 3..scheme_end + 3 + at];
            if let Some(colon) = creds.find(':') {
                return format!(
                    "{}{}:***{}",
                    &s[..scheme_end + 3],
                    &creds[..colon],
                    &s[scheme_end + 3 + at..]
                );
            }
        }
    }
    s
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub location: StoreLocation,
    pub group_commit_max_events: usize,
    pub queue: usize,
    /// See [`DEFAULT_QUEUE_BYTES`].
    pub queue_bytes: usize,
    /// Test-only crash point: abort right after this many group commits, before replying.
    pub abort_after_commits: Option<u64>,
    /// This gateway node's id (`gateway.node_id`): the owner recorded by its sessions' claims
    /// and the key of its heartbeat row.
    pub node: String,
}

/// The node id when `gateway.node_id` is not set.
pub const DEFAULT_NODE: &str = "gateway";

impl StoreSettings {
    pub fn sqlite(path: impl Into<PathBuf>) -> StoreSettings {
        StoreSettings {
            location: StoreLocation::Sqlite(path.into()),
            group_commit_max_events: 2000,
            queue: DEFAULT_QUEUE,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            abort_after_commits: None,
            node: DEFAULT_NODE.to_string(),
        }
    }
}

pub use crate::config::valid_schema;

/// The SQLite adapter behind `store`, if it is one (its page limit is a test and quota hook).
pub fn as_sqlite(store: &Arc<Store>) -> Option<&sqlite::SqliteStore> {
    let any: &dyn std::any::Any = store.as_ref();
    any.downcast_ref::<sqlite::SqliteStore>()
}

/// Opens (and migrates) a SQLite store with default settings (tools and tests).
pub fn open_sqlite(path: &std::path::Path) -> Result<Arc<Store>, StoreError> {
    open(&StoreSettings::sqlite(path))
}

/// Opens (and migrates) the store the settings name.
pub fn open(settings: &StoreSettings) -> Result<Arc<Store>, StoreError> {
    match &settings.location {
        StoreLocation::Sqlite(path) => {
            let s: Arc<Store> = sqlite::SqliteStore::open_with(path, settings)?;
            Ok(s)
        }
        #[cfg(feature = "postgres")]
        StoreLocation::Postgres { url, schema } => {
            let s: Arc<Store> = postgres::PgStore::open(url, schema, settings)?;
            Ok(s)
        }
        #[cfg(not(feature = "postgres"))]
        StoreLocation::Postgres { .. } => Err(StoreError::Open {
            store: settings.location.to_string(),
            message: "this build has no PostgreSQL support (feature `postgres`)".into(),
        }),
    }
}

/// Waits for a store call on the calling thread (tools, checkers and tests that are not async).
/// Blocks that thread: never call it from a gateway handler.
pub fn wait<T>(f: StoreFuture<T>) -> Result<T, StoreError> {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = f;
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// Schema-flagged events of a batch that are new to the store (a resend of what is already
/// acknowledged is not counted again).
pub(crate) fn newly_flagged(events: &[IncomingEvent], acked: u64) -> usize {
    events
        .iter()
        .filter(|ie| ie.event.seq > acked && ie.problem.is_some())
        .count()
}

pub(crate) fn now_iso() -> String {
    iso_from_millis(crate::security::unix_now_ms() as i64)
}

pub(crate) fn new_update_id() -> String {
    let a: u64 = rand::random();
    let b: u64 = rand::random();
    format!("upd_{a:016x}{b:016x}")
}

/// A new down-channel message id (`msg_` and 128 random bits).
pub(crate) fn new_message_id() -> String {
    let a: u64 = rand::random();
    let b: u64 = rand::random();
    format!("msg_{a:016x}{b:016x}")
}

/// Adds one to `channel`'s count.
pub(crate) fn count_channel(counts: &mut Vec<(String, u64)>, channel: String) {
    match counts.iter_mut().find(|(c, _)| *c == channel) {
        Some((_, n)) => *n += 1,
        None => counts.push((channel, 1)),
    }
}

/// The columns a [`ChannelRecord`] is read from, in order (`payload` last).
pub(crate) const CHANNEL_COLUMNS: &str = "row_id, message_id, clinic_id, channel, direction, delivery, status, deliveries, created_ms, updated_ms, expires_ms, batch_id";

/// A write, as the writer thread runs it.
#[derive(Debug)]
pub(crate) enum Op {
    Hello {
        clinic: String,
        source: u64,
        node: String,
    },
    /// An operator confirmed a re-install: the next new source is taken.
    AllowSourceReset {
        clinic: String,
    },
    CancelUpdate {
        update_id: String,
    },
    Append {
        clinic: String,
        source: u64,
        epoch: u64,
        prev_seq: u64,
        events: Vec<IncomingEvent>,
    },
    Release {
        clinic: String,
        epoch: u64,
    },
    NodeBeat {
        node: String,
        addr: String,
        started_at: String,
        sessions: u64,
        at_ms: u64,
    },
    EnqueueChannel(Vec<NewChannelMessage>),
    MarkChannelSent(Vec<String>),
    ChannelResult {
        clinic: String,
        message_id: String,
        status: String,
    },
    ExpireChannels {
        now_ms: u64,
        purge_before_ms: u64,
    },
    EnqueueUpdate(NewUpdate),
    EnqueueBatch(Vec<NewUpdate>),
    MarkDelivered(Vec<String>),
    UpdateResult {
        clinic: String,
        update_id: String,
        status: tether_schemas::UpdateStatus,
        reason: Option<String>,
    },
    AdvanceCursor {
        name: String,
        from: u64,
        to: u64,
    },
    Replay {
        name: String,
        event_id: u64,
    },
    AddDeadLetter {
        name: String,
        event_id: u64,
        attempts: u32,
        error: String,
    },
    RemoveDeadLetter {
        name: String,
        id: u64,
    },
    Prune {
        cutoff: String,
        below_id: u64,
        batch: usize,
    },
    RememberToken {
        jti: String,
        expires_at: u64,
    },
    AddEnrolmentCode(NewEnrolmentCode),
    PutRegistryEntry {
        clinic: String,
        entry_json: String,
    },
    DeleteRegistryEntry {
        clinic: String,
    },
    TakeEnrolmentCode {
        code_hash: String,
        by: String,
    },
    ReturnEnrolmentCode {
        code_hash: String,
    },
    WithdrawEnrolmentCodes {
        clinic: String,
    },
    ForwardCall(ForwardedCall),
    TakeCall {
        id: String,
        node: String,
    },
    AnswerCall {
        id: String,
        answer: String,
    },
    CallAnswer {
        id: String,
    },
    DropCall {
        id: String,
    },
    ClusterKey {
        candidate: String,
    },
    Ping,
    /// SQLite only: `PRAGMA max_page_count` (run alone, outside a transaction).
    PageLimit(Option<u64>),
}

impl Op {
    fn weight(&self) -> usize {
        match self {
            Op::Append { events, .. } => events.len().max(1),
            _ => 1,
        }
    }

    /// Memory the op holds while it waits (events only; other writes are small).
    fn bytes(&self) -> usize {
        match self {
            Op::Append { events, .. } => events
                .iter()
                .map(|ie| {
                    let e = &ie.event;
                    EVENT_OVERHEAD
                        + e.key.get().len()
                        + e.row.as_deref().map_or(0, |r| r.get().len())
                        + e.entity.len()
                        + e.committed_at.len()
                        + ie.problem.as_deref().map_or(0, str::len)
                })
                .sum(),
            _ => 0,
        }
    }
}

/// An incoming event's own size beyond its text: the struct and four allocations.
const EVENT_OVERHEAD: usize = std::mem::size_of::<IncomingEvent>() + 4 * 16;

/// What a write resolved to.
#[derive(Debug)]
pub(crate) enum Done {
    Claim(Claim),
    Append(AppendOutcome),
    Id(String),
    Bool(bool),
    Unit,
    Replay(Result<(), u64>),
    Pruned(Pruned),
    Call(Option<ForwardedCall>),
    Ids(Vec<String>),
    Cancel(CancelOutcome),
    /// `AnswerCall`: the node that forwarded the call; `CallAnswer`: the answer.
    Text(Option<String>),
    Code(CodeTake),
    /// The registry's version after a change (`None`: nothing to change).
    Version(Option<u64>),
    Flags(Vec<bool>),
    Counts(Vec<(String, u64)>),
    /// A channel message's answer recorded: its channel and publication time (ms).
    Recorded(Option<(String, u64)>),
}

pub(crate) struct Cmd {
    op: Op,
    /// What `op` counts against the writer's byte budget.
    bytes: usize,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// An adapter's write side: runs a group of writes in one transaction.
pub(crate) trait Backend: Send + 'static {
    /// One result per op, in order, all of them durable when this returns `Ok`; `Err` when the
    /// group as a whole failed (nothing of it committed).
    fn run_group(&mut self, ops: &[Op]) -> Result<Vec<Result<Done, StoreError>>, StoreError>;
    /// An op that must run alone, outside a transaction (SQLite's page limit).
    fn run_alone(&mut self, _op: &Op) {}
}

/// The sending side of the writer thread.
pub(crate) struct Writer {
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Bytes of the ops queued or being written, and the most allowed.
    pending: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Writer {
    pub(crate) fn spawn<B: Backend>(
        name: &str,
        backend: B,
        settings: &StoreSettings,
    ) -> Result<Writer, StoreError> {
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let max = settings.group_commit_max_events.max(1);
        let abort = settings.abort_after_commits;
        let pending = Arc::new(AtomicUsize::new(0));
        let held = pending.clone();
        let thread = std::thread::Builder::new()
            .name(format!("store-writer-{name}"))
            .spawn(move || writer_loop(backend, rx, max, abort, &held))
            .map_err(|e| StoreError::Open {
                store: name.to_string(),
                message: e.to_string(),
            })?;
        Ok(Writer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            pending,
            max_bytes: settings.queue_bytes.max(1),
        })
    }

    /// Queues `op`; a full queue, or events past the byte budget, fail at once (retryable),
    /// never block the caller. One op alone always fits (a frame is bounded by its own limit).
    pub(crate) fn submit(
        &self,
        op: Op,
    ) -> impl std::future::Future<Output = Result<Done, StoreError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let bytes = op.bytes();
        let before = self.pending.fetch_add(bytes, Ordering::AcqRel);
        let sent = if bytes > 0 && before > 0 && before + bytes > self.max_bytes {
            Err(StoreError::Unavailable {
                retryable: true,
                message: format!(
                    "store: {before} bytes of events already wait for their commit (limit {})",
                    self.max_bytes
                ),
            })
        } else {
            let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                None => Err(StoreError::Stopped),
                Some(tx) => tx.try_send(Cmd { op, bytes, reply }).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => StoreError::busy("store"),
                    mpsc::error::TrySendError::Closed(_) => StoreError::Stopped,
                }),
            }
        };
        if sent.is_err() {
            self.pending.fetch_sub(bytes, Ordering::AcqRel);
        }
        async move {
            sent?;
            rx.await.map_err(|_| StoreError::Stopped)?
        }
    }

    /// A write that answers nothing but its success.
    pub(crate) fn unit(&self, op: Op) -> StoreFuture<()> {
        expect(self.submit(op), |d| match d {
            Done::Unit => Some(()),
            _ => None,
        })
    }

    /// A write that answers yes or no.
    pub(crate) fn boolean(&self, op: Op) -> StoreFuture<bool> {
        expect(self.submit(op), |d| match d {
            Done::Bool(b) => Some(b),
            _ => None,
        })
    }

    pub(crate) fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

fn writer_loop<B: Backend>(
    mut backend: B,
    mut rx: mpsc::Receiver<Cmd>,
    max_events: usize,
    abort_after_commits: Option<u64>,
    pending: &AtomicUsize,
) {
    let mut commits = 0u64;
    let mut held: Option<Cmd> = None;
    loop {
        let first = match held.take() {
            Some(c) => c,
            None => match rx.blocking_recv() {
                Some(c) => c,
                None => return,
            },
        };
        if matches!(first.op, Op::PageLimit(_)) {
            backend.run_alone(&first.op);
            let _ = first.reply.send(Ok(Done::Unit));
            pending.fetch_sub(first.bytes, Ordering::AcqRel);
            continue;
        }
        let mut weight = first.op.weight();
        let mut group = vec![first];
        while weight < max_events {
            match rx.try_recv() {
                Ok(cmd) if matches!(cmd.op, Op::PageLimit(_)) => {
                    held = Some(cmd);
                    break;
                }
                Ok(cmd) => {
                    weight += cmd.op.weight();
                    group.push(cmd);
                }
                Err(_) => break,
            }
        }
        let bytes: usize = group.iter().map(|c| c.bytes).sum();
        let (ops, replies): (Vec<Op>, Vec<_>) = group.into_iter().map(|c| (c.op, c.reply)).unzip();
        let outcome = backend.run_group(&ops);
        drop(ops);
        pending.fetch_sub(bytes, Ordering::AcqRel);
        commits += 1;
        if outcome.is_ok() && abort_after_commits == Some(commits) {
            // Test-only crash point: durable, not yet acknowledged.
            log::error!(target: "error", "event=fault_abort_after_commit commits={commits}");
            std::process::abort();
        }
        match outcome {
            Ok(results) => {
                for (reply, res) in replies.into_iter().zip(results) {
                    let _ = reply.send(res);
                }
            }
            Err(e) => {
                log::error!(target: "error", "event=store_group_failed ops={} error={e}", replies.len());
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Read connections, used one at a time from tokio's blocking pool.
pub(crate) struct ReadPool<C> {
    idle: Mutex<Vec<C>>,
    max_idle: usize,
}

impl<C: Send + 'static> ReadPool<C> {
    pub(crate) fn new(max_idle: usize) -> ReadPool<C> {
        ReadPool {
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// Every idle connection (to close them somewhere safe).
    pub(crate) fn drain(&self) -> Vec<C> {
        std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn take(&self) -> Option<C> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// Returns a connection that is still good.
    fn give_back(&self, c: C) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(c);
        }
    }

    /// Runs `f` on a connection (from `open` when none is idle) on a blocking thread. A
    /// connection whose call failed is dropped, not returned (it may be broken).
    pub(crate) fn run<T: Send + 'static>(
        self: &Arc<Self>,
        open: impl FnOnce() -> Result<C, StoreError> + Send + 'static,
        f: impl FnOnce(&mut C) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<T> {
        let pool = self.clone();
        let job = move || {
            let mut conn = match pool.take() {
                Some(c) => c,
                None => open()?,
            };
            let out = f(&mut conn);
            if out.is_ok() {
                pool.give_back(conn);
            }
            out
        };
        Box::pin(async move {
            if tokio::runtime::Handle::try_current().is_err() {
                // Outside any runtime (tools, a test's plain thread): the caller blocks anyway.
                return job();
            }
            tokio::task::spawn_blocking(job)
                .await
                .map_err(|e| StoreError::Unavailable {
                    retryable: true,
                    message: format!("read task: {e}"),
                })?
        })
    }
}

/// Maps a write's `Done` to the type its method returns.
pub(crate) fn expect<T>(
    fut: impl std::future::Future<Output = Result<Done, StoreError>> + Send + 'static,
    pick: fn(Done) -> Option<T>,
) -> StoreFuture<T>
where
    T: Send + 'static,
{
    Box::pin(async move {
        let done = fut.await?;
        pick(done).ok_or_else(|| StoreError::Unavailable {
            retryable: false,
            message: "writer answered a different kind of result".into(),
        })
    })
}

/// The port's write methods, the same for every adapter: each queues an [`Op`] on the adapter's
/// `writer` field and maps the [`Done`] it resolves to. Expands inside `impl GatewayStore`.
macro_rules! write_methods {
    () => {
        fn node(&self) -> &str {
            &self.node
        }

        fn hello(&self, clinic: &str, source: u64) -> StoreFuture<super::Claim> {
            let op = Op::Hello {
                clinic: clinic.into(),
                source,
                node: self.node.clone(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Claim(c) => Some(c),
                _ => None,
            })
        }

        fn allow_source_reset(&self, clinic: &str) -> StoreFuture<bool> {
            self.writer.boolean(Op::AllowSourceReset {
                clinic: clinic.into(),
            })
        }

        fn append(
            &self,
            clinic: &str,
            source: u64,
            epoch: u64,
            prev_seq: u64,
            events: Vec<IncomingEvent>,
        ) -> StoreFuture<AppendOutcome> {
            let op = Op::Append {
                clinic: clinic.into(),
                source,
                epoch,
                prev_seq,
                events,
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Append(a) => Some(a),
                _ => None,
            })
        }

        fn enqueue_channel(
            &self,
            messages: Vec<super::NewChannelMessage>,
        ) -> StoreFuture<Vec<bool>> {
            super::expect(
                self.writer.submit(Op::EnqueueChannel(messages)),
                |d| match d {
                    Done::Flags(v) => Some(v),
                    _ => None,
                },
            )
        }

        fn mark_channel_sent(&self, ids: Vec<String>) -> StoreFuture<Vec<String>> {
            super::expect(self.writer.submit(Op::MarkChannelSent(ids)), |d| match d {
                Done::Ids(v) => Some(v),
                _ => None,
            })
        }

        fn channel_result(
            &self,
            clinic: &str,
            message_id: &str,
            status: &str,
        ) -> StoreFuture<Option<(String, u64)>> {
            let op = Op::ChannelResult {
                clinic: clinic.into(),
                message_id: message_id.into(),
                status: status.into(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Recorded(r) => Some(r),
                _ => None,
            })
        }

        fn expire_channels(
            &self,
            now_ms: u64,
            purge_before_ms: u64,
        ) -> StoreFuture<Vec<(String, u64)>> {
            let op = Op::ExpireChannels {
                now_ms,
                purge_before_ms,
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Counts(v) => Some(v),
                _ => None,
            })
        }

        fn enqueue_update(&self, update: NewUpdate) -> StoreFuture<String> {
            super::expect(self.writer.submit(Op::EnqueueUpdate(update)), |d| match d {
                Done::Id(s) => Some(s),
                _ => None,
            })
        }

        fn enqueue_batch(&self, updates: Vec<NewUpdate>) -> StoreFuture<Vec<String>> {
            super::expect(self.writer.submit(Op::EnqueueBatch(updates)), |d| match d {
                Done::Ids(v) => Some(v),
                _ => None,
            })
        }

        fn mark_delivered(&self, ids: Vec<String>) -> StoreFuture<Vec<String>> {
            super::expect(self.writer.submit(Op::MarkDelivered(ids)), |d| match d {
                Done::Ids(v) => Some(v),
                _ => None,
            })
        }

        fn cancel_update(&self, update_id: &str) -> StoreFuture<super::CancelOutcome> {
            let op = Op::CancelUpdate {
                update_id: update_id.into(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Cancel(c) => Some(c),
                _ => None,
            })
        }

        fn update_result(
            &self,
            clinic: &str,
            update_id: &str,
            status: tether_schemas::UpdateStatus,
            reason: Option<String>,
        ) -> StoreFuture<bool> {
            self.writer.boolean(Op::UpdateResult {
                clinic: clinic.into(),
                update_id: update_id.into(),
                status,
                reason,
            })
        }

        fn advance_webhook_cursor(&self, name: &str, from: u64, to: u64) -> StoreFuture<bool> {
            self.writer.boolean(Op::AdvanceCursor {
                name: name.into(),
                from,
                to,
            })
        }

        fn replay_webhook(&self, name: &str, event_id: u64) -> StoreFuture<Result<(), u64>> {
            let op = Op::Replay {
                name: name.into(),
                event_id,
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Replay(r) => Some(r),
                _ => None,
            })
        }

        fn add_dead_letter(
            &self,
            name: &str,
            event_id: u64,
            attempts: u32,
            error: &str,
        ) -> StoreFuture<()> {
            self.writer.unit(Op::AddDeadLetter {
                name: name.into(),
                event_id,
                attempts,
                error: error.into(),
            })
        }

        fn remove_dead_letter(&self, name: &str, id: u64) -> StoreFuture<bool> {
            self.writer.boolean(Op::RemoveDeadLetter {
                name: name.into(),
                id,
            })
        }

        fn prune(&self, cutoff: &str, below_id: u64, batch: usize) -> StoreFuture<Pruned> {
            let op = Op::Prune {
                cutoff: cutoff.into(),
                below_id,
                batch,
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Pruned(p) => Some(p),
                _ => None,
            })
        }

        fn remember_token(&self, jti: &str, expires_at: u64) -> StoreFuture<bool> {
            self.writer.boolean(Op::RememberToken {
                jti: jti.into(),
                expires_at,
            })
        }

        fn check_writer(&self) -> StoreFuture<()> {
            self.writer.unit(Op::Ping)
        }

        fn put_registry_entry(&self, clinic: &str, entry_json: &str) -> StoreFuture<u64> {
            let op = Op::PutRegistryEntry {
                clinic: clinic.into(),
                entry_json: entry_json.into(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Version(Some(v)) => Some(v),
                _ => None,
            })
        }

        fn delete_registry_entry(&self, clinic: &str) -> StoreFuture<Option<u64>> {
            let op = Op::DeleteRegistryEntry {
                clinic: clinic.into(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Version(v) => Some(v),
                _ => None,
            })
        }

        fn add_enrolment_code(&self, code: super::NewEnrolmentCode) -> StoreFuture<()> {
            self.writer.unit(Op::AddEnrolmentCode(code))
        }

        fn take_enrolment_code(&self, code_hash: &str, by: &str) -> StoreFuture<super::CodeTake> {
            let op = Op::TakeEnrolmentCode {
                code_hash: code_hash.into(),
                by: by.into(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Code(c) => Some(c),
                _ => None,
            })
        }

        fn withdraw_enrolment_codes(&self, clinic: &str) -> StoreFuture<u64> {
            let op = Op::WithdrawEnrolmentCodes {
                clinic: clinic.into(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Version(Some(n)) => Some(n),
                _ => None,
            })
        }

        fn return_enrolment_code(&self, code_hash: &str) -> StoreFuture<()> {
            self.writer.unit(Op::ReturnEnrolmentCode {
                code_hash: code_hash.into(),
            })
        }

        fn forward_call(&self, call: ForwardedCall) -> StoreFuture<()> {
            self.writer.unit(Op::ForwardCall(call))
        }

        fn take_call(&self, id: &str) -> StoreFuture<Option<ForwardedCall>> {
            let op = Op::TakeCall {
                id: id.into(),
                node: self.node.clone(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Call(c) => Some(c),
                _ => None,
            })
        }

        fn answer_call(&self, id: &str, answer: &str) -> StoreFuture<bool> {
            let op = Op::AnswerCall {
                id: id.into(),
                answer: answer.into(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Text(from) => Some(from.is_some()),
                _ => None,
            })
        }

        fn call_answer(&self, id: &str) -> StoreFuture<Option<String>> {
            let op = Op::CallAnswer { id: id.into() };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Text(t) => Some(t),
                _ => None,
            })
        }

        fn drop_call(&self, id: &str) -> StoreFuture<()> {
            self.writer.unit(Op::DropCall { id: id.into() })
        }

        fn cluster_key(&self, candidate: &str) -> StoreFuture<String> {
            let op = Op::ClusterKey {
                candidate: candidate.into(),
            };
            super::expect(self.writer.submit(op), |d| match d {
                Done::Text(Some(k)) => Some(k),
                _ => None,
            })
        }

        fn release(&self, clinic: &str, epoch: u64) -> StoreFuture<()> {
            self.writer.unit(Op::Release {
                clinic: clinic.into(),
                epoch,
            })
        }

        fn node_beat(&self, addr: &str, started_at: &str, sessions: u64) -> StoreFuture<()> {
            self.writer.unit(Op::NodeBeat {
                node: self.node.clone(),
                addr: addr.into(),
                started_at: started_at.into(),
                sessions,
                at_ms: crate::security::unix_now_ms(),
            })
        }

        fn close(&self) {
            self.writer.close();
        }
    };
}
pub(crate) use write_methods;

/// Refuses a store whose schema version (`found`) is newer than the migrations this binary has.
pub(crate) fn check_version(store: &str, found: i64, supported: usize) -> Result<(), StoreError> {
    if found > supported as i64 {
        return Err(StoreError::TooNew {
            store: store.to_string(),
            found,
            supported: supported as i64,
        });
    }
    Ok(())
}

/// The JSON text of a key and a row (`what` names the event or update in the error).
fn key_row_json(
    key: &serde_json::Map<String, serde_json::Value>,
    row: Option<&serde_json::Map<String, serde_json::Value>>,
    what: impl FnOnce() -> String,
) -> Result<(String, Option<String>), StoreError> {
    let text = (|| {
        Ok((
            serde_json::to_string(key)?,
            row.map(serde_json::to_string).transpose()?,
        ))
    })();
    text.map_err(|e: serde_json::Error| StoreError::Unavailable {
        retryable: false,
        message: format!("{}: {e}", what()),
    })
}

pub(crate) fn update_json(u: &NewUpdate) -> Result<(String, Option<String>), StoreError> {
    key_row_json(&u.key, u.row.as_ref(), || "update".into())
}

/// A retried enqueue (same `Idempotency-Key`): the first update's id when the body is the same,
/// a conflict when it is not.
pub(crate) fn same_update(
    u: &NewUpdate,
    key: &str,
    row: &Option<String>,
    first_id: String,
    (entity, op, key_json, row_json): (&str, &str, &str, &Option<String>),
) -> Result<String, StoreError> {
    if entity == u.entity && op == u.op.as_str() && key_json == key && row_json == row {
        Ok(first_id)
    } else {
        Err(StoreError::Conflict(format!(
            "Idempotency-Key already used for update {first_id} with another body"
        )))
    }
}

/// A forwarded call is removed this long after its caller stopped waiting, if nobody removed it.
pub(crate) const CALL_MARGIN_MS: u64 = 60_000;

/// The params of a forwarded call as stored (JSON text), back to a map.
pub(crate) fn call_params(
    id: &str,
    text: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Unavailable {
        retryable: false,
        message: format!("forwarded call {id}: params: {e}"),
    })
}

/// Token ids are kept this long past their expiry (well beyond any verification leeway).
pub(crate) const TOKEN_ID_MARGIN_S: u64 = 600;

/// A listed code's row: (hash, created_at, created_by, expires_at unix s, used_at, used_by).
pub(crate) type CodeRow = (String, String, String, i64, Option<String>, Option<String>);

pub(crate) fn code_record(r: CodeRow) -> CodeRecord {
    let (hash, created_at, created_by, expires_at, used_at, used_by) = r;
    CodeRecord {
        hash_prefix: hash.chars().take(8).collect(),
        created_at,
        created_by,
        expires_at: iso_from_millis(expires_at.saturating_mul(1000)),
        used_at,
        used_by,
    }
}

const CODES_SQL: &str = "SELECT code_hash, created_at, created_by, expires_at, used_at, used_by \
     FROM enrolment_codes WHERE clinic_id = $1 ORDER BY created_at DESC, code_hash";

/// How long a code stays in the store after it expired (so a late try hears "expired", not
/// "unknown").
pub(crate) const ENROLMENT_CODE_KEEP_S: u64 = 7 * 24 * 3600;

/// What a stored code's row says about taking it now.
pub(crate) fn judge_code(
    clinic_id: String,
    labels_json: String,
    expires_at: i64,
    used: Option<(String, String)>,
    now: u64,
) -> CodeTake {
    match used {
        Some((at, by)) => CodeTake::Used { at, by },
        None if expires_at < 0 || (expires_at as u64) < now => CodeTake::Expired { clinic_id },
        None => CodeTake::Taken {
            clinic_id,
            labels_json,
        },
    }
}

pub(crate) fn log_outbox_recreated(clinic: &str, old: u64, new: u64, acked: u64) {
    log::warn!(target: "error", "clinic={clinic} event=outbox_recreated old_source={old} new_source={new} old_acked_seq={acked} confirmed_by=operator action=position_restarts_at_0");
    log::warn!(target: "audit", "event=outbox_recreated clinic={clinic} old_source={old} new_source={new} confirmed_by=operator");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that holds each group until the test lets it go.
    struct Gated(std::sync::mpsc::Receiver<()>);

    impl Backend for Gated {
        fn run_group(&mut self, ops: &[Op]) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
            let _ = self.0.recv();
            Ok(ops
                .iter()
                .map(|_| {
                    Ok(Done::Append(AppendOutcome::Stored {
                        acked: 1,
                        inserted: 1,
                    }))
                })
                .collect())
        }
    }

    fn append_of(bytes: usize) -> Op {
        let event = tether_schemas::Event {
            seq: 1,
            entity: "e".into(),
            op: tether_schemas::Op::Insert,
            key: serde_json::Map::new(),
            row: serde_json::json!({"pad": "x".repeat(bytes)})
                .as_object()
                .cloned(),
            committed_at: "t".into(),
        };
        Op::Append {
            clinic: "c".into(),
            source: 0,
            epoch: 0,
            prev_seq: 0,
            events: vec![IncomingEvent::from_event(&event, None)],
        }
    }

    /// Events waiting for their commit are bounded in bytes: past the budget an append is
    /// refused at once (retryable), and accepted again once the writer has caught up.
    #[test]
    fn events_waiting_for_commit_are_bounded_in_bytes() {
        let (gate, held) = std::sync::mpsc::channel();
        let mut settings = StoreSettings::sqlite("unused");
        settings.queue_bytes = 30_000;
        let w = Writer::spawn("gated", Gated(held), &settings).expect("writer");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let first = w.submit(append_of(20_000));
        let refused = rt.block_on(w.submit(append_of(20_000)));
        assert!(
            matches!(&refused, Err(StoreError::Unavailable { retryable: true, message }) if message.contains("wait for their commit")),
            "{refused:?}"
        );
        // Small writes are not events: they still pass.
        let small = w.submit(Op::Ping);
        gate.send(()).expect("release");
        assert!(rt.block_on(first).is_ok());
        gate.send(()).expect("release");
        assert!(rt.block_on(small).is_ok());
        assert_eq!(w.pending.load(Ordering::Acquire), 0);
        let again = w.submit(append_of(20_000));
        gate.send(()).expect("release");
        assert!(
            rt.block_on(again).is_ok(),
            "accepted once the writer caught up"
        );
        // One append larger than the whole budget still goes through when nothing waits.
        let big = w.submit(append_of(50_000));
        gate.send(()).expect("release");
        assert!(rt.block_on(big).is_ok());
        drop(gate);
        w.close();
    }

    #[test]
    fn passwords_never_reach_a_log_line() {
        assert_eq!(
            redact_url("postgres://tether:s3cret@db:5432/t"),
            "postgres://tether:***@db:5432/t"
        );
        assert_eq!(
            redact_url("host=db user=t password=s3cret dbname=x"),
            "host=db user=t password=*** dbname=x"
        );
        assert_eq!(redact_url("postgres://db/t"), "postgres://db/t");
    }
}

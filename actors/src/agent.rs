//! Wiring of one clinic agent: the four actors under one [`Supervisor`].
//!
//! ```text
//!   watcher ──Enqueue──► outbound ──SendFrame──► connection ◄──ws──► gateway
//!                           ▲  LinkUp/LinkDown/Acked  │
//!                           └─────────────────────────┤ Apply
//!                                                     ▼
//!                                                  applier
//! ```

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::applier::Applier;
use crate::backoff::Backoff;
use crate::connection::Connection;
use crate::outbound::Outbound;
use crate::ports::{ChangeSink, ChangeSource, Checkpoint, Clock, Dialer};
use crate::stats::AgentStats;
use crate::supervisor::{RestartPolicy, Shutdown, Slot, Supervisor};
use crate::watcher::Watcher;

/// Everything an agent's actors need to know. Built from the `agent:` config section.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub clinic_id: String,
    /// `ws://host:port/v1/ws` or `wss://…`.
    pub gateway_url: String,
    pub agent_version: String,
    pub heartbeat_interval: Duration,
    /// Time allowed for TCP connect + WebSocket upgrade + `welcome`.
    pub connect_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub backoff_stable_after: Duration,
    pub poll_interval: Duration,
    /// Rows the watcher reads from the outbox at a time.
    pub read_chunk: usize,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub max_inflight_batches: usize,
    /// Events held in memory between the outbox and the socket (back-pressure bound).
    pub max_buffered_events: usize,
    pub outbox_retention: Duration,
    pub purge_interval: Duration,
    pub max_frame_bytes: usize,
    pub restart: RestartPolicy,
    /// Which link to the gateway: WebSocket, the HTTP fallback, or WebSocket with fallback.
    pub transport: Transport,
    /// Blocked WebSocket upgrades in a row before `Transport::Auto` falls back to HTTP.
    pub fallback_after: u32,
    /// On the HTTP fallback, how often `Transport::Auto` probes for a working WebSocket.
    pub upgrade_retry: Duration,
}

/// The agent's choice of link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket; the HTTP fallback when upgrades are blocked, and back when they pass.
    Auto,
    WebSocket,
    Http,
}

impl Transport {
    pub fn parse(s: &str) -> Option<Transport> {
        match s {
            "auto" => Some(Transport::Auto),
            "websocket" => Some(Transport::WebSocket),
            "http" => Some(Transport::Http),
            _ => None,
        }
    }
}

impl AgentSettings {
    /// Defaults for everything but identity and address.
    pub fn new(clinic_id: impl Into<String>, gateway_url: impl Into<String>) -> Self {
        AgentSettings {
            clinic_id: clinic_id.into(),
            gateway_url: gateway_url.into(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            heartbeat_interval: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(60),
            backoff_stable_after: Duration::from_secs(60),
            poll_interval: Duration::from_millis(50),
            read_chunk: 1000,
            batch_max_events: 500,
            batch_max_bytes: 512 * 1024,
            max_inflight_batches: 4,
            max_buffered_events: 10_000,
            outbox_retention: Duration::from_secs(24 * 3600),
            purge_interval: Duration::from_secs(60),
            max_frame_bytes: tether_schemas::DEFAULT_MAX_FRAME_BYTES,
            restart: RestartPolicy::default(),
            transport: Transport::Auto,
            fallback_after: 3,
            upgrade_retry: Duration::from_secs(300),
        }
    }

    /// The HTTP fallback's base URL: the WebSocket URL with `http(s)` and `/v1/http`.
    pub fn http_base(&self) -> String {
        let url = &self.gateway_url;
        let (scheme, rest) = if let Some(r) = url.strip_prefix("wss://") {
            ("https://", r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            ("http://", r)
        } else {
            ("", url.as_str())
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        format!("{scheme}{authority}/v1/http")
    }

    pub fn backoff(&self) -> Backoff {
        Backoff::new(
            self.backoff_base,
            self.backoff_cap,
            self.backoff_stable_after,
        )
    }
}

/// The adapters an agent runs on.
#[derive(Clone)]
pub struct AgentPorts {
    pub source: Arc<dyn ChangeSource>,
    pub checkpoint: Arc<dyn Checkpoint>,
    pub sink: Arc<dyn ChangeSink>,
    pub dialer: Arc<dyn Dialer>,
    pub clock: Arc<dyn Clock>,
    /// The allow-listed queries the gateway may ask for (`rpc_request`).
    pub queries: Arc<dyn crate::ports::QueryRunner>,
    /// Channel definitions, local subscribers and waiting messages (survives actor restarts).
    pub channels: Arc<crate::channels::ChannelBoard>,
    /// What the agent holds for as long as any of its actors lives (the database's one-agent
    /// lock): released when the last of them is gone.
    pub held: Vec<Arc<dyn std::any::Any + Send + Sync>>,
}

/// Late-bound addresses of the four actors.
#[derive(Clone, Default)]
pub struct Slots {
    pub connection: Slot<Connection>,
    pub watcher: Slot<Watcher>,
    pub outbound: Slot<Outbound>,
    pub applier: Slot<Applier>,
}

/// Names used in logs, stats and fault injection.
pub const ACTOR_NAMES: [&str; 4] = ["connection", "watcher", "outbound", "applier"];

/// A running agent.
pub struct AgentHandle {
    pub supervisor: Addr<Supervisor>,
    pub stats: Arc<AgentStats>,
    pub slots: Slots,
}

impl AgentHandle {
    /// Stop restarting actors (before tearing the agent's arbiter down).
    pub fn shutdown(&self) {
        self.supervisor.do_send(Shutdown);
    }

    /// Resolves once the agent has loaded its checkpoint from the clinic database (the outbound
    /// queue answers with its position): the database is reachable and the actors run. Being
    /// connected is not required — a clinic may be offline for hours and still be working.
    pub async fn wait_ready(&self) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if let Some(o) = self.slots.outbound.get() {
                if let Ok(Some(_)) = o.send(crate::outbound::Position).await {
                    return;
                }
            }
        }
    }

    /// Graceful shutdown: stop restarting actors, stop reading new outbox rows, wait (at most
    /// `timeout`) until every batch already sent is acknowledged and checkpointed, close the
    /// socket with a close frame, let the applier finish the update it is applying, and stop
    /// all four actors. Whatever was not acknowledged stays in the outbox and is sent by the
    /// next run: the checkpoint only ever moves on an ack.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        use crate::connection::Close;
        use crate::outbound::{Drain, Halt};
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let _ = self.supervisor.send(Shutdown).await;
        if let Some(w) = self.slots.watcher.get() {
            let _ = w.send(Halt).await;
        }
        let mut report = DrainReport::default();
        match self.slots.outbound.get() {
            Some(o) => match tokio::time::timeout_at(deadline, o.send(Drain)).await {
                Ok(Ok(Ok(out))) => {
                    report.acked_seq = out.acked_seq;
                    report.unacked_events = out.unacked_events;
                    report.link_lost = out.link_lost;
                }
                Ok(Ok(Err(e))) => report.error = Some(e.to_string()),
                Ok(Err(e)) => report.error = Some(format!("outbound queue gone: {e}")),
                Err(_) => report.timed_out = true,
            },
            None => report.error = Some("outbound queue not running".into()),
        }
        if report.acked_seq == 0 {
            report.acked_seq = self
                .stats
                .acked_seq
                .load(std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(c) = self.slots.connection.get() {
            // The close handshake gets what is left of the budget, and at least a moment.
            let close_by = deadline.max(tokio::time::Instant::now() + Duration::from_millis(500));
            if tokio::time::timeout_at(close_by, c.send(Close))
                .await
                .is_err()
            {
                report.close_timed_out = true;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), c.send(Halt)).await;
        }
        if let Some(a) = self.slots.applier.get() {
            // Waits for the update being applied (one transaction), within reason.
            let _ = tokio::time::timeout(Duration::from_secs(5), a.send(Halt)).await;
        }
        if let Some(o) = self.slots.outbound.get() {
            let _ = tokio::time::timeout(Duration::from_secs(1), o.send(Halt)).await;
        }
        report.elapsed = started.elapsed();
        report
    }

    /// Makes one actor panic. Returns false if it is not running right now.
    #[cfg(feature = "fault-injection")]
    pub fn inject_panic(&self, actor: &str) -> bool {
        use crate::InjectPanic;
        fn send<A>(slot: &Slot<A>) -> bool
        where
            A: Actor<Context = Context<A>> + Handler<InjectPanic>,
        {
            slot.get().map(|a| a.do_send(InjectPanic)).is_some()
        }
        match actor {
            "connection" => send(&self.slots.connection),
            "watcher" => send(&self.slots.watcher),
            "outbound" => send(&self.slots.outbound),
            "applier" => send(&self.slots.applier),
            _ => false,
        }
    }
}

/// How a graceful shutdown went.
#[derive(Debug, Clone, Default)]
pub struct DrainReport {
    /// Durable at the gateway and checkpointed.
    pub acked_seq: u64,
    /// Read from the outbox but not acknowledged; they stay in the outbox for the next run.
    pub unacked_events: usize,
    /// The link was down (or went down) before everything in flight was acknowledged.
    pub link_lost: bool,
    /// The acknowledgements did not all arrive within the drain timeout.
    pub timed_out: bool,
    /// The gateway did not answer the close frame in time.
    pub close_timed_out: bool,
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl DrainReport {
    /// Nothing read from the outbox was left unacknowledged (a clinic that was offline with
    /// nothing in flight is clean too).
    pub fn clean(&self) -> bool {
        !self.timed_out && self.unacked_events == 0 && self.error.is_none()
    }
}

/// Starts an agent on the current arbiter. Must run inside an actix `System`.
pub fn start_agent(settings: AgentSettings, ports: AgentPorts) -> AgentHandle {
    let settings = Arc::new(settings);
    let stats = Arc::new(AgentStats::default());
    let slots = Slots::default();

    let sup = Supervisor::new(settings.clinic_id.clone(), settings.restart, stats.clone());

    let (s, p, st, sl) = (
        settings.clone(),
        ports.clone(),
        stats.clone(),
        slots.clone(),
    );
    let sup = sup.child("connection", move |guard| {
        let a = Connection::new(guard, s.clone(), p.clone(), st.clone(), sl.clone());
        sl.connection.set(a.start());
    });
    let (s, p, st, sl) = (
        settings.clone(),
        ports.clone(),
        stats.clone(),
        slots.clone(),
    );
    let sup = sup.child("outbound", move |guard| {
        let a = Outbound::new(
            guard,
            s.clone(),
            p.checkpoint.clone(),
            st.clone(),
            sl.clone(),
        );
        sl.outbound.set(a.start());
    });
    let (s, p, sl) = (settings.clone(), ports.clone(), slots.clone());
    let sup = sup.child("watcher", move |guard| {
        let a = Watcher::new(guard, s.clone(), p.source.clone(), sl.clone());
        sl.watcher.set(a.start());
    });
    let (p, st, sl) = (ports.clone(), stats.clone(), slots.clone());
    let sup = sup.child("applier", move |guard| {
        let a = Applier::new(guard, p.sink.clone(), st.clone());
        sl.applier.set(a.start());
    });

    AgentHandle {
        supervisor: sup.start(),
        stats,
        slots,
    }
}

/// Runs a blocking port call on the blocking pool, never on the arbiter thread.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, crate::PortError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, crate::PortError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::PortError::new(format!("blocking task failed: {e}")))?
}

//! Gateway registry: knows every clinic seen since start — whether a session is connected, its
//! last heartbeat, its acknowledged position and how many updates wait for it — and routes
//! "updates pending" notices to the clinic's live session. A second session for a clinic
//! replaces the first, which is told to close.
//! Takes: `Register`, `Refused`, `Unregister`, `Touch`, `Acked`, `UpdatesPending`, `Snapshot`.
//! Sends: `SessionCommand` to sessions.
//! State: in memory only; the durable truth (positions, updates) is in the gateway store, and
//! sessions re-register when agents reconnect.

use std::collections::BTreeMap;
use std::time::SystemTime;

use actix::prelude::*;

use crate::log_target::CONNECTION;

/// What the registry asks of a session.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum SessionCommand {
    /// A newer connection for the same clinic took over: close.
    Replaced { by_session: String },
    /// New cloud updates were queued for this clinic.
    DeliverUpdates,
    /// These keys of the clinic were revoked or removed from the registry: a session opened
    /// with one of them closes (1008).
    Revoked { kids: Vec<String> },
    /// The gateway is stopping: finish the store writes in flight (and ack them), take no new
    /// batch, then close with 1001.
    Shutdown,
    /// Relay an `rpc_request` to the agent (`POST /v1/clinics/{id}/rpc`); the answer goes to
    /// whoever registered `request_id` with the gateway.
    Rpc {
        request_id: String,
        name: String,
        params: tether_schemas::Row,
    },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClinicLive {
    pub clinic_id: String,
    pub connected: bool,
    pub session_id: Option<String>,
    pub remote_addr: Option<String>,
    pub connected_since_ms: Option<u64>,
    pub last_heartbeat_ms: Option<u64>,
    pub acked_seq: u64,
    pub sessions_total: u64,
    /// `websocket` or `http` (the fallback) for the current (or last) session.
    pub transport: Option<String>,
    /// `connected`; `reconnecting` (link lost less than `offline_after` ago); `offline`.
    pub state: &'static str,
    pub disconnected_at_ms: Option<u64>,
    /// Why the last session ended.
    pub last_close: Option<String>,
    /// The highest outbox sequence the agent had read when it last sent (its `head_seq`).
    pub head_seq: u64,
    /// Events the agent has read and the gateway does not hold yet (`head_seq - acked_seq`).
    pub lag_events: u64,
    /// Age of the clinic's oldest unacknowledged change (ms): 0 when the gateway holds
    /// everything the agent has read; unknown (`None`) before the first acknowledgement, or
    /// when an agent that does not send `next_committed_at` is behind.
    pub lag_ms: Option<u64>,
    /// When that oldest unacknowledged change was committed (Unix ms, this gateway's clock).
    pub oldest_unacked_ms: Option<u64>,
    /// `hello.agent_version` of the current (or last) session.
    pub agent_version: Option<String>,
    /// The clinic is flagged as lagging (see [`Registry::new`]).
    pub lagging: bool,
    /// Sessions ended by the gateway for silence.
    pub evictions: u64,
    /// Actor restarts the agent reported (since its process started).
    pub agent_restarts: u64,
    /// Why the clinic's last attempt was refused after authentication (`duplicate_source`),
    /// until a session opens.
    pub refused: Option<String>,
}

/// One clinic lifecycle event, for the SSE stream and the dashboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lifecycle {
    /// Increases by one per event of this gateway run.
    pub id: u64,
    pub at_ms: u64,
    pub clinic_id: String,
    /// `connected`, `disconnected`, `evicted`, `offline`, `lagging`, `caught_up`, `refused`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

struct Entry {
    live: ClinicLive,
    session: Option<Recipient<SessionCommand>>,
}

pub struct Registry {
    clinics: BTreeMap<String, Entry>,
    events: tokio::sync::broadcast::Sender<Lifecycle>,
    next_event: u64,
    offline_after: std::time::Duration,
    lag_events_limit: u64,
    lag_ms_limit: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(std::time::Duration::from_secs(30), 10_000, 60_000)
    }
}

/// The age of `l`'s oldest unacknowledged change at `now` (see [`ClinicLive::lag_ms`]).
fn lag_now(l: &ClinicLive, now: u64) -> Option<u64> {
    match (l.lag_events, l.oldest_unacked_ms) {
        (0, _) if l.acked_seq > 0 || l.head_seq > 0 => Some(0),
        (0, _) => None,
        (_, Some(t)) => Some(now.saturating_sub(t)),
        (_, None) => None,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Links lost longer than `offline_after` ago turn `offline`.
        let tick = (self.offline_after / 4).max(std::time::Duration::from_millis(50));
        ctx.run_interval(tick, |act, _| {
            let now = now_ms();
            let limit = act.offline_after.as_millis() as u64;
            let mut gone = Vec::new();
            for e in act.clinics.values_mut() {
                if e.live.state == "reconnecting"
                    && e.live
                        .disconnected_at_ms
                        .is_some_and(|t| now.saturating_sub(t) >= limit)
                {
                    e.live.state = "offline";
                    gone.push(e.live.clinic_id.clone());
                }
            }
            for c in gone {
                log::warn!(target: CONNECTION, "clinic={c} event=offline after_ms={limit}");
                act.emit(&c, "offline", None);
            }
            // A clinic whose oldest unacknowledged change keeps ageing (a stalled link, a slow
            // store) turns `lagging` without waiting for its next acknowledgement.
            let behind: Vec<String> = act
                .clinics
                .values_mut()
                .filter(|e| e.live.oldest_unacked_ms.is_some())
                .map(|e| {
                    e.live.lag_ms = lag_now(&e.live, now);
                    e.live.clinic_id.clone()
                })
                .collect();
            for c in behind {
                act.check_lag(&c);
            }
        });
    }
}

impl Registry {
    /// `offline_after`: how long a lost link counts as `reconnecting` before `offline`.
    /// A clinic is `lagging` when it has more than `lag_events` read and not stored, or its
    /// oldest unacknowledged change is older than `lag_ms`.
    pub fn new(offline_after: std::time::Duration, lag_events: u64, lag_ms: u64) -> Self {
        Registry {
            clinics: BTreeMap::new(),
            events: tokio::sync::broadcast::channel(1024).0,
            next_event: 0,
            offline_after,
            lag_events_limit: lag_events,
            lag_ms_limit: lag_ms,
        }
    }

    fn emit(&mut self, clinic: &str, kind: &'static str, detail: Option<String>) {
        self.next_event += 1;
        // No subscriber is fine: the event is for whoever listens now.
        let _ = self.events.send(Lifecycle {
            id: self.next_event,
            at_ms: now_ms(),
            clinic_id: clinic.to_string(),
            kind,
            detail,
        });
    }

    fn check_lag(&mut self, clinic: &str) {
        let (ev_limit, ms_limit) = (self.lag_events_limit, self.lag_ms_limit);
        let Some(e) = self.clinics.get_mut(clinic) else {
            return;
        };
        let l = &mut e.live;
        let behind = l.lag_events > ev_limit || l.lag_ms.is_some_and(|m| m > ms_limit);
        if behind == l.lagging {
            return;
        }
        l.lagging = behind;
        let detail = format!(
            "lag_events={} lag_ms={}",
            l.lag_events,
            l.lag_ms.unwrap_or(0)
        );
        if behind {
            log::warn!(target: CONNECTION, "clinic={clinic} event=lagging {detail}");
            self.emit(clinic, "lagging", Some(detail));
        } else {
            log::info!(target: CONNECTION, "clinic={clinic} event=caught_up {detail}");
            self.emit(clinic, "caught_up", Some(detail));
        }
    }

    fn entry(&mut self, clinic: &str) -> &mut Entry {
        self.clinics
            .entry(clinic.to_string())
            .or_insert_with(|| Entry {
                live: ClinicLive {
                    clinic_id: clinic.to_string(),
                    connected: false,
                    session_id: None,
                    remote_addr: None,
                    connected_since_ms: None,
                    last_heartbeat_ms: None,
                    acked_seq: 0,
                    sessions_total: 0,
                    transport: None,
                    state: "offline",
                    disconnected_at_ms: None,
                    last_close: None,
                    head_seq: 0,
                    lag_events: 0,
                    lag_ms: None,
                    oldest_unacked_ms: None,
                    agent_version: None,
                    lagging: false,
                    evictions: 0,
                    agent_restarts: 0,
                    refused: None,
                },
                session: None,
            })
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub clinic_id: String,
    pub session_id: String,
    pub remote_addr: Option<String>,
    pub acked_seq: u64,
    pub session: Recipient<SessionCommand>,
    /// `websocket` or `http`.
    pub transport: &'static str,
    /// From `hello.restarts`.
    pub restarts: Option<u64>,
    /// From `hello.agent_version`.
    pub agent_version: String,
}

impl Handler<Register> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Register, _: &mut Self::Context) {
        let e = self.entry(&msg.clinic_id);
        if let (Some(old), Some(old_id)) = (e.session.take(), e.live.session_id.clone()) {
            log::warn!(target: CONNECTION, "clinic={} event=session_replaced old_session={old_id} new_session={}", msg.clinic_id, msg.session_id);
            old.do_send(SessionCommand::Replaced {
                by_session: msg.session_id.clone(),
            });
        }
        let now = now_ms();
        e.session = Some(msg.session);
        e.live.connected = true;
        e.live.session_id = Some(msg.session_id);
        e.live.transport = Some(msg.transport.to_string());
        e.live.remote_addr = msg.remote_addr;
        e.live.connected_since_ms = Some(now);
        e.live.last_heartbeat_ms = Some(now);
        e.live.acked_seq = msg.acked_seq;
        e.live.head_seq = msg.acked_seq;
        e.live.lag_events = 0;
        e.live.oldest_unacked_ms = None;
        e.live.agent_version = Some(msg.agent_version);
        e.live.sessions_total += 1;
        if let Some(r) = msg.restarts {
            e.live.agent_restarts = r;
        }
        e.live.state = "connected";
        e.live.disconnected_at_ms = None;
        e.live.refused = None;
        let detail = format!("transport={}", msg.transport);
        self.emit(&msg.clinic_id, "connected", Some(detail));
    }
}

/// A clinic's attempt was refused after it authenticated (e.g. `duplicate_source`): kept on
/// the clinic for the fleet views until a session opens, and a lifecycle event `refused`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Refused {
    pub clinic_id: String,
    pub reason: String,
}

impl Handler<Refused> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Refused, _: &mut Self::Context) {
        let e = self.entry(&msg.clinic_id);
        let first = e.live.refused.as_deref() != Some(msg.reason.as_str());
        e.live.refused = Some(msg.reason.clone());
        if first {
            self.emit(&msg.clinic_id, "refused", Some(msg.reason));
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub clinic_id: String,
    pub session_id: String,
    /// Why the session ended (close reason, or "connection lost").
    pub reason: String,
    /// The agent said goodbye (it is stopping): `offline` at once, not `reconnecting`.
    pub goodbye: bool,
    /// The gateway closed it for silence.
    pub evicted: bool,
}

impl Handler<Unregister> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Unregister, _: &mut Self::Context) {
        let Some(e) = self.clinics.get_mut(&msg.clinic_id) else {
            return;
        };
        // Only the current session may mark the clinic disconnected.
        if e.live.session_id.as_deref() != Some(msg.session_id.as_str()) || !e.live.connected {
            return;
        }
        e.session = None;
        e.live.connected = false;
        e.live.connected_since_ms = None;
        e.live.disconnected_at_ms = Some(now_ms());
        e.live.last_close = Some(msg.reason.clone());
        e.live.state = if msg.goodbye {
            "offline"
        } else {
            "reconnecting"
        };
        if msg.evicted {
            e.live.evictions += 1;
        }
        let kind = if msg.evicted {
            "evicted"
        } else {
            "disconnected"
        };
        let goodbye = msg.goodbye;
        self.emit(&msg.clinic_id, kind, Some(msg.reason));
        if goodbye {
            self.emit(&msg.clinic_id, "offline", Some("agent stopped".into()));
        }
    }
}

/// Hands a command to the clinic's current session: `false` when it has none.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct ToClinic {
    pub clinic_id: String,
    pub cmd: SessionCommand,
}

impl Handler<ToClinic> for Registry {
    type Result = bool;
    fn handle(&mut self, msg: ToClinic, _: &mut Self::Context) -> bool {
        match self
            .clinics
            .get(&msg.clinic_id)
            .and_then(|e| e.session.as_ref())
        {
            Some(s) => s.try_send(msg.cmd).is_ok(),
            None => false,
        }
    }
}

/// A receiver of every lifecycle event from now on.
#[derive(Message)]
#[rtype(result = "tokio::sync::broadcast::Receiver<Lifecycle>")]
pub struct Subscribe;

impl Handler<Subscribe> for Registry {
    type Result = MessageResult<Subscribe>;
    fn handle(&mut self, _: Subscribe, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.events.subscribe())
    }
}

/// Tells every open session that the gateway is stopping. Answers how many were told.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ShutdownSessions;

impl Handler<ShutdownSessions> for Registry {
    type Result = usize;
    fn handle(&mut self, _: ShutdownSessions, _: &mut Self::Context) -> usize {
        let mut n = 0;
        for e in self.clinics.values() {
            if let Some(s) = &e.session {
                s.do_send(SessionCommand::Shutdown);
                n += 1;
            }
        }
        n
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Touch {
    pub clinic_id: String,
}

impl Handler<Touch> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Touch, _: &mut Self::Context) {
        if let Some(e) = self.clinics.get_mut(&msg.clinic_id) {
            e.live.last_heartbeat_ms = Some(now_ms());
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Acked {
    pub clinic_id: String,
    pub seq: u64,
    /// The agent's `head_seq` from the batch, when it sent one.
    pub head_seq: Option<u64>,
    /// The batch's `next_committed_at` on the gateway's clock (Unix ms): the clinic's oldest
    /// unacknowledged change once this batch is acknowledged.
    pub next_committed_ms: Option<u64>,
    /// The agent's `restarts` from the batch, when it sent one.
    pub restarts: Option<u64>,
}

impl Handler<Acked> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Acked, _: &mut Self::Context) {
        let e = self.entry(&msg.clinic_id);
        let l = &mut e.live;
        l.acked_seq = l.acked_seq.max(msg.seq);
        l.head_seq = msg.head_seq.unwrap_or(l.head_seq).max(l.acked_seq);
        l.lag_events = l.head_seq - l.acked_seq;
        l.oldest_unacked_ms = if l.lag_events == 0 {
            None
        } else {
            msg.next_committed_ms
        };
        l.lag_ms = lag_now(l, now_ms());
        if let Some(r) = msg.restarts {
            l.agent_restarts = r;
        }
        self.check_lag(&msg.clinic_id);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct UpdatesPending {
    pub clinic_id: String,
}

impl Handler<UpdatesPending> for Registry {
    type Result = ();
    fn handle(&mut self, msg: UpdatesPending, _: &mut Self::Context) {
        if let Some(s) = self
            .clinics
            .get(&msg.clinic_id)
            .and_then(|e| e.session.as_ref())
        {
            s.do_send(SessionCommand::DeliverUpdates);
        }
    }
}

#[derive(Message)]
#[rtype(result = "Vec<ClinicLive>")]
pub struct Snapshot;

impl Handler<Snapshot> for Registry {
    type Result = MessageResult<Snapshot>;
    fn handle(&mut self, _: Snapshot, _: &mut Self::Context) -> Self::Result {
        let now = now_ms();
        MessageResult(
            self.clinics
                .values()
                .map(|e| {
                    let mut l = e.live.clone();
                    l.lag_ms = lag_now(&l, now);
                    l
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    async fn next_kind(
        rx: &mut tokio::sync::broadcast::Receiver<Lifecycle>,
        kind: &str,
    ) -> Lifecycle {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Ok(e)) if e.kind == kind => return e,
                Ok(Ok(_)) => continue,
                other => panic!("no {kind} event within 10 s: {other:?}"),
            }
        }
    }

    #[actix_rt::test]
    async fn lag_is_the_age_of_the_oldest_unacknowledged_change_and_turns_lagging_as_it_ages() {
        // Lagging past 1 s; the registry's tick runs every 50 ms (offline_after / 4).
        let reg = Registry::new(Duration::from_millis(200), 10_000, 1_000).start();
        let mut rx = reg.send(Subscribe).await.expect("subscribe");
        let committed = now_ms() - 100;
        reg.send(Acked {
            clinic_id: "c".into(),
            seq: 5,
            head_seq: Some(8),
            next_committed_ms: Some(committed),
            restarts: None,
        })
        .await
        .expect("acked");
        let live = reg.send(Snapshot).await.expect("snapshot");
        assert_eq!(live[0].lag_events, 3);
        let lag = live[0].lag_ms.expect("lag known");
        assert!(lag >= 100, "the change is at least 100 ms old: {lag}");
        // No acknowledgement comes: the change ages past the limit and the clinic turns
        // lagging on its own (at the ack it was ~100 ms old).
        let e = next_kind(&mut rx, "lagging").await;
        let detail = e.detail.unwrap_or_default();
        let ms: u64 = detail
            .rsplit("lag_ms=")
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(ms > 1_000, "{detail}");
        // Everything read is acknowledged: lag 0, caught up.
        reg.send(Acked {
            clinic_id: "c".into(),
            seq: 8,
            head_seq: Some(8),
            next_committed_ms: None,
            restarts: None,
        })
        .await
        .expect("acked");
        next_kind(&mut rx, "caught_up").await;
        let live = reg.send(Snapshot).await.expect("snapshot");
        assert_eq!((live[0].lag_events, live[0].lag_ms), (0, Some(0)));
        assert!(!live[0].lagging);
    }

    #[actix_rt::test]
    async fn an_agent_behind_that_does_not_say_when_its_oldest_change_was_committed_has_no_lag_time(
    ) {
        let reg = Registry::default().start();
        reg.send(Acked {
            clinic_id: "c".into(),
            seq: 5,
            head_seq: Some(9),
            next_committed_ms: None,
            restarts: None,
        })
        .await
        .expect("acked");
        let live = reg.send(Snapshot).await.expect("snapshot");
        assert_eq!((live[0].lag_events, live[0].lag_ms), (4, None));
    }
}
